"""Run the quota service: `python -m services.quota`."""

from libs.main import run_service
from services.quota.app import run

if __name__ == "__main__":
    run_service("quota", 50052, run)
