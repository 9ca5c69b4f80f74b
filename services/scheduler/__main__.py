"""Run a scheduler replica: `python -m services.scheduler`."""

from libs.main import run_service
from services.scheduler.app import run

if __name__ == "__main__":
    run_service("scheduler", 50054, run)
