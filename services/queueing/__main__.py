"""Run the queueing service: `python -m services.queueing`."""

from libs.main import run_service
from services.queueing.app import run

if __name__ == "__main__":
    run_service("queueing", 50053, run)
