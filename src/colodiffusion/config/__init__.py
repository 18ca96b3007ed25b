"""The config layer: a typed schema, its validation, YAML loading with `key=value` overrides, the
layouts users bring from elsewhere, and the `config --all` listing. One module each:

- `schema.py`: the dataclasses, a docstring per key (the only place a key is declared);
- `validation.py`: choices, ranges, paths and the rules between keys (`validate`);
- `loading.py`: defaults <- YAML file(s) <- overrides (`load_config`, `to_yaml`);
- `compat.py`: the original latent-diffusion YAML layout and kohya dataset TOMLs / subsets;
- `prompts.py`: sample prompts with kohya-style inline options, and the sampler names;
- `listing.py`: `describe`, every key with its value, default, allowed values and help.

Import from the package (`from colodiffusion.config import Config, load_config`); the names below
are its interface.
"""

from colodiffusion.config.compat import (KOHYA_DATASET_KEYS, KOHYA_SUBSET_KEYS, MOVED_KEYS, PRECISION_ALIASES,
                                         SEED_KEYS, SEED_OVERRIDES, folder_subsets)
from colodiffusion.config.errors import ConfigError
from colodiffusion.config.listing import describe, field_docs
from colodiffusion.config.loading import load_config, refuse_interpolations, to_yaml
from colodiffusion.config.prompts import (KARRAS_SAMPLERS, PROMPT_OPTIONS, SAMPLER_NAMES, PromptSpec, check_prompt,
                                          multiples_of_8, parse_prompt, read_prompt_file)
from colodiffusion.config.schema import (TRACKERS, ColossalAIOptions, Config, DataConfig, DeepSpeedOptions,
                                         DiffusionConfig, EMAConfig, EvalConfig, FirstStageConfig, LoRAConfig,
                                         LogConfig, ModelConfig, ParallelConfig, PerfConfig, RunConfig, SampleConfig,
                                         SubsetConfig, TrainConfig, TrainerConfig, _walk, choice, report_to)
from colodiffusion.config.validation import (GEMINI_FRACTIONS, SDPA_KERNELS, is_hub_id, parse_sdpa_by_head_dim,
                                             validate)

__all__ = [
    "ConfigError",
    # schema
    "Config", "RunConfig", "ModelConfig", "FirstStageConfig", "DiffusionConfig", "SubsetConfig", "DataConfig",
    "EMAConfig", "SampleConfig", "LoRAConfig", "TrainConfig", "ParallelConfig", "DeepSpeedOptions",
    "ColossalAIOptions", "PerfConfig", "LogConfig", "EvalConfig", "TrainerConfig", "TRACKERS", "choice",
    "report_to", "_walk",
    # prompts
    "PromptSpec", "PROMPT_OPTIONS", "SAMPLER_NAMES", "KARRAS_SAMPLERS", "parse_prompt", "read_prompt_file",
    "check_prompt", "multiples_of_8",
    # validation
    "validate", "is_hub_id", "parse_sdpa_by_head_dim", "SDPA_KERNELS", "GEMINI_FRACTIONS",
    # loading
    "load_config", "to_yaml", "refuse_interpolations",
    # compatibility
    "SEED_KEYS", "SEED_OVERRIDES", "MOVED_KEYS", "PRECISION_ALIASES", "KOHYA_SUBSET_KEYS", "KOHYA_DATASET_KEYS",
    "folder_subsets",
    # listing
    "describe", "field_docs",
]
