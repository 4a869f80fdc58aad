"""FSDP2Strategy: Lightning's ModelParallelStrategy as plain data-parallel FSDP2 over every process."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) on every device of every node; ``EMFineTune.configure_model``
    shards the model (``model.sharding``). Lightning's ModelParallelStrategy is made for 2-D parallelism:
    its default data-parallel size is the number of nodes and its tensor-parallel size the devices per
    node; here every process is one data-parallel shard and there is no tensor parallelism.

    Args:
        save_distributed_checkpoint: each rank writes its shard (a checkpoint is then a folder), or rank 0
            writes one consolidated file. Either resumes exactly; ``em-fit eval`` reads both.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        # The one private attribute: ModelParallelStrategy has no public way to say "data-parallel size =
        # world size" before its mesh is built (tested in tests/e2e/test_fsdp2.py; lightning pinned < 2.7).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
