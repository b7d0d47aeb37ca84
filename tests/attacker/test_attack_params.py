"""Each attack's own typed parameters: they reach the attack and change what it does, and bad
ones are refused with the attack and field named."""

from __future__ import annotations

import pytest

from attacker.analytic import Analytic, AnalyticParams
from attacker.api import ATTACKS, AttackConfig, create_attack
from attacker.dlg import DLGParams
from attacker.spear import SpearConfig

CONFIG = AttackConfig(max_iters=40, seed=0, time_budget_s=None)


def test_every_attack_declares_a_frozen_parameter_type():
    for name, cls in ATTACKS.items():
        params = create_attack(name).params
        assert isinstance(params, cls.params_type), name
        with pytest.raises(AttributeError):  # frozen: a created attack's parameters stay put
            params.__setattr__("x", 1)


def test_dlg_max_iters_and_lr_reach_the_optimiser(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    default = create_attack("dlg", CONFIG).reconstruct(dlg_lenet, obs)
    capped = create_attack("dlg", CONFIG, {"max_iters": 2, "lr": 0.5})
    assert capped.config.max_iters == 2 and capped.config.lr == 0.5 and capped.params.lr == 0.5
    short = capped.reconstruct(dlg_lenet, obs)
    assert short.stats["iterations"] == 2 < default.stats["iterations"]
    assert CONFIG.max_iters == 40  # the caller's config is left as it was


def test_ig_names_its_own_fields_for_the_config_ones(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    attack = create_attack("ig", CONFIG, {"restarts": 1, "lr": 0.05, "max_iters": 3, "tv_weight": 0})
    assert (attack.config.restarts, attack.config.ig_lr, attack.config.tv_weight) == (1, 0.05, 0.0)
    stats = attack.reconstruct(dlg_lenet, obs).stats
    assert stats["restarts"] == 1 and stats["iterations"] <= 3
    assert create_attack("ig", CONFIG).reconstruct(dlg_lenet, obs).stats["restarts"] == 2


def test_analytic_cg_cap_reaches_the_solver(digits, dlg_lenet, make_observation):
    images, labels = digits
    obs = make_observation(dlg_lenet, images[:1], labels[:1])
    quick = AttackConfig(max_iters=1, time_budget_s=None)
    capped = create_attack("analytic", quick, {"cg_max_iters": 3, "polish_above": 1e9})
    stats = capped.reconstruct(dlg_lenet, obs).stats
    convs = [s for s in stats["layers"] if s["type"] == "Conv2d"]
    assert convs and all(s["iterations"] <= 3 for s in convs)
    free = create_attack("analytic", quick, {"polish_above": 1e9}).reconstruct(dlg_lenet, obs).stats
    assert max(s["iterations"] for s in free["layers"]) > 3
    assert free["relative_grad_distance"] < stats["relative_grad_distance"]


def test_keyword_settings_and_parameter_objects_agree():
    assert Analytic(cg_tol=1e-5).params == AnalyticParams(cg_tol=1e-5)
    assert Analytic(None, AnalyticParams(batch_method="features")).batch_method == "features"
    assert create_attack("spear", None, {"chunk": 64}).params == SpearConfig(chunk=64)
    # A shared field left unset follows the config the attack is created with.
    assert create_attack("idlg", AttackConfig(lr=0.25), {"patience": 3}).params.lr == 0.25
    with pytest.raises(TypeError, match="DLGParams"):
        create_attack("analytic").__class__(None, DLGParams())


@pytest.mark.parametrize(("name", "params", "needle"), [
    ("dlg", {"lrr": 1.0}, "attack 'dlg' has no parameter 'lrr' (known: grad_tol, init,"),
    ("imprint", {"lr": 1.0}, "attack 'imprint' has no parameter 'lr' (known: none)"),
    ("dlg", {"lr": "fast"}, "attack.params.dlg.lr must be a number, got 'fast'"),
    ("dlg", {"max_iters": 1.5}, "attack.params.dlg.max_iters must be an integer"),
    ("dlg", {"max_iters": True}, "attack.params.dlg.max_iters must be an integer"),
    ("dlg", {"lr": None}, "attack.params.dlg.lr may not be none"),
    ("dlg", {"lr": -1}, "attack.params.dlg: lr must be a positive number"),
    ("ig", {"layer_weights": "cubic"}, "attack.params.ig: unknown layer_weights 'cubic'"),
    ("analytic", {"batch_method": "magic"}, "attack.params.analytic: unknown batch_method 'magic'"),
    ("analytic", {"cg_tol": 0}, "attack.params.analytic: need cg_tol > 0"),
    ("spear", {"chunk": 0}, "attack.params.spear: chunk and max_trials must be >= 1"),
])
def test_bad_parameters_are_named(name, params, needle):
    with pytest.raises(ValueError) as err:
        create_attack(name, None, params)
    assert needle in str(err.value)


def test_numeric_strings_and_none_where_allowed():
    # YAML reads 1e-4 (no dot) as a string; line_search may be none (DLG's fixed step).
    attack = create_attack("idlg", None, {"grad_tol": "1e-4", "line_search": None})
    assert attack.config.grad_tol == 1e-4 and attack.config.line_search is None
    assert isinstance(create_attack("dlg", None, {"lr": 2}).config.lr, float)


def test_a_parameter_set_for_one_attack_leaves_the_others_alone():
    dlg = create_attack("dlg", CONFIG, {"lr": 0.1})
    idlg = create_attack("idlg", CONFIG)
    assert dlg.config.lr == 0.1 and idlg.config.lr == CONFIG.lr and idlg.config is CONFIG


def test_the_api_module_imports_no_attack():
    import ast
    import inspect

    import attacker.api

    tree = ast.parse(inspect.getsource(attacker.api))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    attacks = {cls.__module__ for cls in ATTACKS.values()}
    assert attacks and not imported & attacks, imported & attacks
