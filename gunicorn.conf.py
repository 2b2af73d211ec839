"""gunicorn's settings for callstate, read from the working directory (`gunicorn app:app`)."""

from callstate.config import Settings
from callstate.logs import logging_config

# Logging: the service's own lines and gunicorn's, access log included, in LOG_FORMAT. The access
# log shows the path without its query string (`%(U)s`), which may carry a token or a number.
logconfig_dict = logging_config(Settings.from_env().log_format)
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(M)sms'
