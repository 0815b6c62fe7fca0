import pytest
from django.urls import reverse

from jobs.models import Membership


@pytest.fixture
def team_admin(team_user):
    Membership.objects.filter(user=team_user).update(role=Membership.Role.ADMIN)
    return team_user


def test_a_team_admin_adds_a_member_and_sets_the_quota(client, team_admin, django_user_model):
    django_user_model.objects.create_user("carol", password="x-long-password")
    client.force_login(team_admin)
    response = client.post(reverse("team_detail"), {"add_member": "1", "username": "carol", "role": "member"}, follow=True)
    assert "carol joined acme as member" in response.content.decode()
    assert Membership.objects.filter(team__name="acme", user__username="carol", role="member").exists()

    again = client.post(reverse("team_detail"), {"add_member": "1", "username": "carol", "role": "member"})
    assert "carol is already in team acme" in again.content.decode()
    nobody = client.post(reverse("team_detail"), {"add_member": "1", "username": "nobody", "role": "member"})
    assert "no user named &#x27;nobody&#x27;" in nobody.content.decode()

    client.post(reverse("team_detail"), {"save_quota": "1", "max_running_jobs": "2", "max_queued_jobs": "5"})
    team = Membership.objects.get(user=team_admin).team
    team.refresh_from_db()
    assert (team.max_running_jobs, team.max_queued_jobs) == (2, 5)


def test_a_plain_member_sees_the_team_but_cannot_change_it(client, team_user, django_user_model):
    client.force_login(team_user)
    page = client.get(reverse("team_detail")).content.decode()
    assert "alice" in page and "Save quota" not in page and "Add member" not in page
    assert client.post(reverse("team_detail"), {"save_quota": "1", "max_queued_jobs": "1"}).status_code == 404
    other = Membership.objects.create(team=Membership.objects.get(user=team_user).team,
                                      user=django_user_model.objects.create_user("dave", password="x-long-password"))
    assert client.post(reverse("team_member_remove", args=[other.pk])).status_code == 404
    assert Membership.objects.filter(pk=other.pk).exists()


def test_an_admin_cannot_remove_another_teams_member(client, team_admin, other_team_user):
    client.force_login(team_admin)
    membership = Membership.objects.get(user=other_team_user)
    assert client.post(reverse("team_member_remove", args=[membership.pk])).status_code == 404
    assert Membership.objects.filter(pk=membership.pk).exists()
