"""Postgres side: migrations, the projector, the hash-chained event log, read models, queries."""

from plugind.projections.hashchain import (
    GENESIS,
    ChainRow,
    VerifyResult,
    chain_hash,
    verify_chain,
    verify_event_log,
)
from plugind.projections.lag import projector_lag
from plugind.projections.migrate import migrate
from plugind.projections.projector import (
    EVENT_LOG_CHECKPOINT,
    ProjectionConflictError,
    Projector,
)
from plugind.projections.queries import (
    Checkpoint,
    EventPage,
    EventRow,
    PluginRow,
    TaskRow,
    get_checkpoint,
    get_task,
    list_plugins,
    query_events,
)
from plugind.projections.read_models import apply_event, apply_events, statement_for
from plugind.projections.rebuild import (
    Diff,
    RebuildResult,
    read_models_equal_rebuild,
    rebuild_read_models,
)
from plugind.projections.replay import ReplayState, state_at
from plugind.projections.stats import DurationStats, GroupStats, TaskStats, task_stats

__all__ = [
    "EVENT_LOG_CHECKPOINT",
    "GENESIS",
    "ChainRow",
    "Checkpoint",
    "Diff",
    "DurationStats",
    "EventPage",
    "EventRow",
    "GroupStats",
    "PluginRow",
    "ProjectionConflictError",
    "Projector",
    "RebuildResult",
    "ReplayState",
    "TaskRow",
    "TaskStats",
    "VerifyResult",
    "apply_event",
    "apply_events",
    "chain_hash",
    "get_checkpoint",
    "get_task",
    "list_plugins",
    "migrate",
    "projector_lag",
    "query_events",
    "read_models_equal_rebuild",
    "rebuild_read_models",
    "state_at",
    "statement_for",
    "task_stats",
    "verify_chain",
    "verify_event_log",
]
