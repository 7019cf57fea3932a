"""The objective table: no `cm.loss` string dispatch outside `cm/objectives/`, every spec
consistent, and any config taking `--config.cm.loss=NAME`.

The dispatch check reads the project's code (not the tests) with `ast` and finds a
comparison of something named `loss` (`cfg.loss`, `config.cm.loss`, `saved["cm"]["loss"]`,
a variable `loss`) with a string constant or a tuple / list / set of them, and `match`
statements on it. It first proves it finds planted ones.
"""

import ast
import os

import pytest

from cm import config as config_lib
from cm import objectives
from cm.runtime.views import CMConfig, ConfigError
from configs import cifar10_ddpm, cifar10_edm, quickstart
from tests.test_imports import ROOT, project_modules

TABLE = os.path.join("cm", "objectives")


def _names_loss(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr == "loss"
    if isinstance(node, ast.Name):
        return node.id == "loss"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "loss"
    return False


def _strings(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return bool(node.elts) and all(_strings(e) for e in node.elts)
    return False


def loss_dispatch(source: str, filename: str = "<string>") -> list[int]:
    """Line numbers where `source` compares a `loss` with string constants."""
    lines = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_names_loss(s) for s in sides) and any(_strings(s) for s in sides):
                lines.append(node.lineno)
        elif isinstance(node, ast.Match) and _names_loss(node.subject):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_dispatch_check_finds_planted_comparisons():
    planted = '''
def f(cfg, config, saved, loss):
    if cfg.loss == "ct":
        pass
    if config.cm.loss in ("edm", "ddpm"):
        pass
    if saved["cm"]["loss"] != 'cd':
        pass
    ok = loss not in {"ict"}
    match cfg.loss:
        case "ct":
            pass
    fine = cfg.loss == other.teacher  # not a constant: the table's own answer
    fine = value == "ct"  # not a loss
'''
    assert sorted(loss_dispatch(planted)) == [3, 5, 7, 9, 10]


def test_no_loss_dispatch_outside_the_objectives_package():
    found = []
    for path in project_modules().values():
        rel = os.path.relpath(path, ROOT)
        if rel.startswith(TABLE):
            continue
        found += [f"{rel}:{line}" for line in loss_dispatch(open(path).read(), path)]
    assert found == []


@pytest.mark.parametrize("name", list(objectives.REGISTRY))
def test_each_spec_is_consistent(name):
    obj = objectives.get(name)
    assert obj.name == name
    fields = set(CMConfig().keys())
    for group in (obj.reads, obj.meaning_fields, obj.objective_fields):
        assert set(group) <= fields, (name, set(group) - fields)
    assert set(obj.meaning_fields) <= set(obj.reads)
    assert set(obj.objective_fields) <= set(obj.reads)
    if obj.teacher:
        assert obj.teacher in objectives.REGISTRY and "teacher_workdir" in obj.reads
    # Its samplers: the defaults it fills in fit it.
    cfg = CMConfig(loss=name)
    resolved = config_lib.build(_with_loss(quickstart.get_config(), name))
    obj.sampling.for_grid(cfg, resolved.sample)
    obj.sampling.check_eval(cfg, resolved.eval)


def _with_loss(config, name):
    config.cm.loss = name
    return config


@pytest.mark.parametrize("name", list(objectives.REGISTRY))
def test_any_config_takes_any_objective(name):
    """`--config.cm.loss=NAME` on a config written for another objective: the sampler
    fields it leaves at base's values follow the objective, and the notes say so."""
    cfg = config_lib.build(_with_loss(quickstart.get_config(), name))
    assert cfg.objective.name == name
    own = objectives.get(name).sampling
    assert own.usable("sample.solver", cfg.sample.solver) or own.default(
        "sample.solver", cfg.sample, cfg.cm) is None
    assert own.usable("eval.samplers", cfg.eval.samplers)
    if cfg.eval.samplers != ("1step", "2step"):
        assert any("eval.samplers" in line for line in cfg.notes)


def test_the_quickstart_as_ddpm_takes_ddims_and_a_set_field_that_cannot_fit_is_an_error():
    cfg = config_lib.build(_with_loss(quickstart.get_config(), "ddpm"))
    assert (cfg.sample.solver, cfg.sample.steps, cfg.eval.samplers) == ("ddim", 50,
                                                                        ("ddim50",))
    assert any("cm.start_scales=10 is not read by cm.loss=ddpm" in n for n in cfg.notes)
    # A DDPM config's own samplers, asked of an EDM model: one clear error.
    with pytest.raises(ConfigError, match="sample.solver='ddim' does not fit cm.loss='edm'"):
        config_lib.build(_with_loss(cifar10_ddpm.get_config(), "edm"))
    with pytest.raises(ConfigError, match=r"eval.samplers: 'heun18' is not a sampler"):
        config_lib.build(_with_loss(cifar10_edm.get_config(), "ddpm"))
    # Consistency sampling reads no solver: a set one is noted, not an error.
    config = quickstart.get_config()
    config.sample.solver = "ddim"
    cfg = config_lib.build(config)
    assert any("sample.solver='ddim' is not read by cm.loss=ict" in n for n in cfg.notes)


def test_unknown_objective_names_the_known_ones():
    with pytest.raises(ConfigError, match="cm.loss must be one of .*'ddpm'"):
        config_lib.build(_with_loss(quickstart.get_config(), "ctt"))
