"""python -m services.monitoring: run the monitoring service."""

from libs.service import load_settings, run
from services.monitoring.bootstrap import MIGRATIONS, build
from services.monitoring.settings import MonitoringSettings

if __name__ == "__main__":
    run(load_settings(MonitoringSettings), migrations=MIGRATIONS, build=build)
