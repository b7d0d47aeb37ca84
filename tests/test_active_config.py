"""attack.strategy: the active model-gossip strategies are checked where they cannot work."""

from __future__ import annotations

import argparse

import pytest

from gradleak.config import (
    AttackSettings,
    ConfigError,
    GossipConfig,
    PeerConfig,
    RunConfig,
    from_dict,
)
from gradleak.flags import add_flags, overlay


def _cfg(strategy: str, **gossip: object) -> RunConfig:
    return RunConfig(peers=PeerConfig(optimizer="sgd", lr=0.3),
                     gossip=GossipConfig(**gossip),  # type: ignore[arg-type]
                     attack=AttackSettings(strategy=strategy))


def test_state_override_runs_only_in_lockstep_model_gossip() -> None:
    assert _cfg("state-override", exchange="models", sync="rounds").validate().attack.strategy == "state-override"
    with pytest.raises(ConfigError, match="--gossip models --sync rounds"):
        _cfg("crafted", exchange="models", sync="async").validate()
    with pytest.raises(ConfigError, match="--gossip models"):
        _cfg("state-override").validate()
    with pytest.raises(ConfigError, match="unknown strategy 'evil'"):
        _cfg("evil", exchange="models", sync="rounds").validate()


def test_the_strategy_flag_reaches_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    raw = overlay(parser.parse_args(["--strategy", "crafted"]))
    assert from_dict(raw).attack.strategy == "crafted"
