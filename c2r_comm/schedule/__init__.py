"""schedule: the order of work inside one MoE layer (serial, or C token chunks pipelined)."""
from c2r_comm.schedule.auto import agree_overlap_degree, choose_overlap_degree, serial_forward, timed_serial_forward
from c2r_comm.schedule.pipeline import ChunkPipeline, PipelineRun

__all__ = ["ChunkPipeline", "PipelineRun", "agree_overlap_degree", "choose_overlap_degree", "serial_forward",
           "timed_serial_forward"]
