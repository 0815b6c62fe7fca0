"""Team scoping: every query for a user's objects goes through here.

Another team's object is simply not found (404), never "forbidden", so its
existence does not leak.
"""

from django.http import Http404

from .models import Dataset, Job, Team


def teams_of(user):
    if user.is_staff:
        return Team.objects.all()
    return Team.objects.filter(memberships__user=user)


def visible(user, queryset):
    """Narrow a queryset of team-owned rows to what `user` may see."""
    model = queryset.model
    if user.is_staff:
        return queryset
    team_path = {Job: "team", Dataset: "team"}.get(model, "job__team")
    # The teams as a subquery, not a join through memberships: no row comes twice, so no DISTINCT, which
    # would have the database sort every visible row, all its columns, before it could take a page of them.
    return queryset.filter(**{f"{team_path}__in": teams_of(user)})


def get_visible_or_404(user, queryset, **lookup):
    try:
        return visible(user, queryset).get(**lookup)
    except queryset.model.DoesNotExist:
        raise Http404(f"No {queryset.model._meta.verbose_name} matches the given query.")


def current_team(user):
    """The team new datasets and jobs go to: the user's first team."""
    team = Team.objects.filter(memberships__user=user).order_by("id").first()
    if team is None and user.is_staff:
        team = Team.objects.order_by("id").first()
    return team
