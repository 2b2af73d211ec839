"""WSGI entry point: `gunicorn app:app`."""

from callstate.web import create_app

app = create_app()
