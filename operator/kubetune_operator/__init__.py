"""kubetune operator: runs FineTuneJobs as trainer pods that survive preemption."""

__version__ = "0.1.0"
