"""Length-bucketed dynamic batching: pure data structures shared by every queue backend."""

from service.batching.assemble import pad_batch, split_outputs
from service.batching.buckets import bucket_edges, bucket_index
from service.batching.forming import PendingBucket, sorted_batches
from service.batching.scheduler import BucketScheduler
from service.batching.types import BatchPolicy, WorkItem

__all__ = [
    "BatchPolicy",
    "BucketScheduler",
    "PendingBucket",
    "WorkItem",
    "bucket_edges",
    "bucket_index",
    "pad_batch",
    "sorted_batches",
    "split_outputs",
]
