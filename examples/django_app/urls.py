from django.urls import path

from . import views

urlpatterns = [
    path("events", views.events, name="events"),
    path("publish", views.publish_view, name="publish"),
]
