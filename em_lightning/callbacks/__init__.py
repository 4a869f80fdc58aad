"""Lightning Callback classes only: thin adapters from Lightning hooks to the library packages.
In YAML: ``class_path: em_lightning.callbacks.AdapterTrajectory`` (or the module path)."""

from em_lightning.callbacks.adapter_trajectory import AdapterTrajectory
from em_lightning.callbacks.alarm import Alarm
from em_lightning.callbacks.checkpointing import StepCheckpoint
from em_lightning.callbacks.in_loop_judge import InLoopJudge
from em_lightning.callbacks.kl_to_base import KLToBase
from em_lightning.callbacks.mechanistic import MechanisticProbes
from em_lightning.callbacks.progress import StepProgressBar
from em_lightning.callbacks.sample_generations import SampleGenerations
from em_lightning.callbacks.step_validation import StepValidation
from em_lightning.callbacks.training_steering import TrainingSteering

__all__ = ["AdapterTrajectory", "Alarm", "InLoopJudge", "KLToBase", "MechanisticProbes", "SampleGenerations", "StepCheckpoint", "StepProgressBar", "StepValidation",
           "TrainingSteering"]
