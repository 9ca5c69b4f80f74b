"""Run the cost service: `python -m services.cost`."""

from libs.main import run_service
from services.cost.app import run

if __name__ == "__main__":
    run_service("cost", 50056, run)
