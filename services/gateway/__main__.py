"""Run the gateway: `python -m services.gateway`."""

from libs.main import run_service
from services.gateway.app import run

if __name__ == "__main__":
    run_service("gateway", 50051, run)
