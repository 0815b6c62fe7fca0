from datetime import timedelta

from django import template

register = template.Library()


@register.filter
def short_duration(value):
    """A timedelta as people say it: '1 h 02 min', '3 min 05 s', '12 s'."""
    if not isinstance(value, timedelta):
        return "–"
    seconds = int(value.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {seconds:02d} s"
    return f"{seconds} s"


@register.filter
def percent(share):
    """A fraction as a percentage: 0.412 -> '41%', 0.042 -> '4.2%' (a small share keeps a digit); '–' when unknown."""
    if share is None or share == "":
        return "–"
    return f"{share:.1%}" if share < 0.1 else f"{share:.0%}"
