"""Lightning training of MoM language models: module, command line, optimiser and schedule, FLOPs."""

from mom_lit.training.cli import MoMLightningCLI, cli_main
from mom_lit.training.flops import training_flops_per_token
from mom_lit.training.module import MoMLightningModule
from mom_lit.training.optim import WarmupCosine, decay_plan, param_groups

__all__ = ["MoMLightningCLI", "MoMLightningModule", "WarmupCosine", "cli_main", "decay_plan", "param_groups",
           "training_flops_per_token"]
