"""Who is calling the API: the user of the `Authorization: Bearer <token>` header, or None."""

from django.utils import timezone

from .models import ApiToken, hash_token


def token_user(request):
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    api_token = (
        ApiToken.objects.select_related("user")
        .filter(hashed_secret=hash_token(token.strip()), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if api_token is None:
        return None
    ApiToken.objects.filter(pk=api_token.pk).update(last_used_at=timezone.now())
    return api_token.user
