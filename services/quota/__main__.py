"""Run the quota service: `python -m services.quota`."""

from libs.main import run_service
from services.quota.app import build
from services.quota.settings import Settings

if __name__ == "__main__":
    run_service("quota", Settings.from_env, build)
