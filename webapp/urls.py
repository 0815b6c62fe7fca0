from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from jobs import rest_api, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("datasets/", views.dataset_list, name="dataset_list"),
    path("datasets/<int:pk>/", views.dataset_detail, name="dataset_detail"),
    path("jobs/", views.job_list, name="job_list"),
    path("jobs/new/", views.job_new, name="job_new"),
    path("jobs/new/estimate/", views.job_estimate, name="job_estimate"),
    path("jobs/<int:pk>/", views.job_detail, name="job_detail"),
    path("jobs/<int:pk>/live/", views.job_live, name="job_live"),
    path("jobs/<int:pk>/cancel/", views.job_action, {"action": "cancel"}, name="job_cancel"),
    path("jobs/<int:pk>/pause/", views.job_action, {"action": "pause"}, name="job_pause"),
    path("jobs/<int:pk>/resume/", views.job_action, {"action": "resume"}, name="job_resume"),
    path("jobs/<int:pk>/delete/", views.job_delete, name="job_delete"),
    path("jobs/<int:pk>/metrics.csv", views.job_metrics_csv, name="job_metrics_csv"),
    path("jobs/<int:pk>/log/", views.job_log, name="job_log"),
    path("artifacts/<int:pk>/download/", views.artifact_download, name="artifact_download"),
    path("checkpoints/<int:pk>/download/", views.checkpoint_download, name="checkpoint_download"),
    path("workers/", views.worker_list, name="worker_list"),
    path("", include("jobs.worker_admin")),
    path("", include("jobs.compare_views")),
    path("", include("jobs.playground_views")),
    path("", include("jobs.sweeps_views")),
    path("", include("jobs.ops_views")),
    path("team/", views.team_detail, name="team_detail"),
    path("team/members/<int:pk>/remove/", views.team_member_remove, name="team_member_remove"),
    path("tokens/", views.token_list, name="token_list"),
    path("tokens/<int:pk>/revoke/", views.token_revoke, name="token_revoke"),
    path("api/", rest_api.api.urls),
    path("v1/", include("jobs.openai_api")),
    path("admin/", admin.site.urls),
]
