"""One typed params root: every setting of every command, in frozen sections, read from YAML in one place.

Precedence everywhere: command-line flag > params file (YAML) > the defaults written once in the sections.
Each field is declared once with `option()` (default, help text, flag name); the command line's flags are
generated from those fields (ghosted.cli.options) and merged by `resolve()`. The CLI, the DVC stages (which
call the CLI with `--config params.yaml`), the Prefect flows and the registry all read their settings through
`load_params()`; `to_json()` is the one way a config becomes JSON.

    typed.py       coercion and checks (build, merged), option()/Flag, Bounds (numeric ranges), registry names,
                   to_json, default
    sections.py    calibration:, prune:
    evaluation.py  eval:, the efficiency measurement, gate:
    runs.py        registry:, sweep:, search:, the compare grid, ghost distillation
    heal.py        heal: (knowledge distillation of a pruned checkpoint from its dense base)
    params.py      the Params root, read_yaml, load_params, resolve
    yaml_io.py     load_yaml: the one safe YAML reader (size, depth, node count, aliases, duplicate keys bounded)
"""

from ghosted.config.evaluation import EfficiencySettings, EvalSettings, GateConfig, check_sources, check_tasks
from ghosted.config.heal import HealConfig
from ghosted.config.params import SECTIONS, Params, load_params, read_yaml, resolve
from ghosted.config.runs import (
    CompareConfig,
    DistillConfig,
    RegistryConfig,
    SearchConfig,
    SweepConfig,
    parse_ks,
    parse_methods,
)
from ghosted.config.sections import CalibrationConfig, PruneConfig
from ghosted.config.typed import (
           DEFAULT_TRACKING_URI,
           GUARDS,
           PPL_SOURCES_HELP,
           REGISTER_MODES,
           VARIANTS,
           Bounds,
           Flag,
           between,
           build,
           check_registry_name,
           default,
           flag_of,
           merged,
           option,
           parse_names,
           to_json,
)
from ghosted.config.yaml_io import load_yaml

__all__ = ["DEFAULT_TRACKING_URI", "GUARDS", "PPL_SOURCES_HELP", "REGISTER_MODES", "SECTIONS", "VARIANTS",
           "CalibrationConfig", "CompareConfig", "DistillConfig", "EfficiencySettings", "EvalSettings", "Flag",
           "GateConfig", "HealConfig", "Params", "PruneConfig", "RegistryConfig", "SearchConfig", "SweepConfig",
           "Bounds", "between", "build", "check_registry_name", "check_sources", "check_tasks", "default", "flag_of",
           "load_params", "load_yaml", "merged", "option", "parse_ks", "parse_methods", "parse_names", "read_yaml",
           "resolve", "to_json"]
