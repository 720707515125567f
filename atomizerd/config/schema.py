"""The whole configuration: one section per component, and the walk over every key."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomizerd.config.agents import (
    AgentConfig,
    ApprovalsConfig,
    AttachmentsConfig,
    BudgetConfig,
    PoolConfig,
    ReaperConfig,
)
from atomizerd.config.notify import NotifyConfig
from atomizerd.config.policy import AtomizerConfig, McpConfig, ModesConfig, SandboxConfig
from atomizerd.config.service import DaemonConfig, LoggingConfig, MetricsConfig


@dataclass
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    atomizer: AtomizerConfig = field(default_factory=AtomizerConfig)
    modes: ModesConfig = field(default_factory=ModesConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    mcp: McpConfig = field(default_factory=McpConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    reaper: ReaperConfig = field(default_factory=ReaperConfig)
    approvals: ApprovalsConfig = field(default_factory=ApprovalsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    attachments: AttachmentsConfig = field(default_factory=AttachmentsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    # Derived paths, resolved once by `resolve()`.
    @property
    def runtime_dir(self) -> Path:
        return Path(self.daemon.runtime_dir)

    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir)

    @property
    def socket_path(self) -> Path:
        return Path(self.daemon.socket)

    @property
    def atomizer_root(self) -> Path:
        return Path(self.atomizer.root)

    @property
    def studies_root(self) -> Path:
        return Path(self.atomizer.studies_root)


def iter_keys(obj: Any = None, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Yields (dotted key, field) for every leaf key, in declaration order."""
    cls = obj if isinstance(obj, type) else type(obj) if obj is not None else Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, name + ".")
        else:
            yield name, f


def leaf_type(key: str) -> Any:
    """The declared type of a dotted key."""
    cls: Any = Config
    *sections, leaf = key.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    return typing.get_type_hints(cls)[leaf]


def get(cfg: Config, key: str) -> Any:
    """The value of a dotted key."""
    target: Any = cfg
    for part in key.split("."):
        target = getattr(target, part)
    return target
