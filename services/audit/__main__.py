"""``python -m services.audit``: run the audit service until SIGTERM or SIGINT."""

from libs.service import load_settings, run
from services.audit.bootstrap import MIGRATIONS, build
from services.audit.settings import AuditSettings

if __name__ == "__main__":
    run(load_settings(AuditSettings), migrations=MIGRATIONS, build=build)
