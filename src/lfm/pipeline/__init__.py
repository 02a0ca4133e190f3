"""The system on top of the five areas: what can be learnt through an interface (`plan`), and
pipelines that chain registered methods across areas with lineage (`run_pipeline`)."""

from lfm.pipeline.plan import TASKS, Plan, plan
from lfm.pipeline.probe import Interface, probe

__all__ = ["TASKS", "Interface", "Plan", "plan", "probe"]
