"""TorchRec's perf and storage estimates, re-derived and vectorized over every option of every table.

The formulas follow torchrec 1.8's default `EmbeddingPerfEstimator` (training evaluators) and
`EmbeddingStorageEstimator` with `PipelineType.NONE`; `tests/test_cost_parity.py` checks them
against TorchRec's own estimators. `fast_model_applies` says when they hold; otherwise the
planner asks TorchRec's estimators (`search_space.from_sharding_options`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
from torchrec.distributed.planner.constants import (
    BATCHED_COPY_PERF_FACTOR,
    BIGINT_DTYPE,
    DP_ELEMENTWISE_KERNELS_PERF_FACTOR,
    FULL_BLOCK_EMB_DIM,
    HALF_BLOCK_PENALTY,
    QUARTER_BLOCK_PENALTY,
    UVM_CACHING_RATIO,
)
from torchrec.distributed.planner.estimator import annotations as _ann
from torchrec.distributed.planner.estimator.types import HardwarePerfConfig, PerfCoefficient
from torchrec.distributed.planner.types import CollectiveType, Topology
from torchrec.distributed.types import StorageUsageType

from fastplan.planner.tables import TableInfo

DP, TW, CW, TWCW, RW, TWRW = (
    "data_parallel",
    "table_wise",
    "column_wise",
    "table_column_wise",
    "row_wise",
    "table_row_wise",
)
PERF_FIELDS = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "prefetch_compute", "input_dist_comms")
_EXACT = float(2**53)


def fast_model_applies(config: HardwarePerfConfig) -> bool:
    """True when `config` behaves like TorchRec's default config, whose formulas are re-derived here."""
    default = PerfCoefficient()
    for st in (DP, TW, CW, TWCW, RW, TWRW):
        coeff = config.get_coefficients_for_sharding(st)
        if coeff.fwd != default or coeff.bwd is not None:
            return False
        for getter in (
            _ann.get_forward_compute,
            _ann.get_backward_compute,
            _ann.get_input_dist_comms,
            _ann.get_fwd_comms,
            _ann.get_bwd_comms,
            _ann.get_output_write_size,
        ):
            if getter(config, st) is not None:
                return False
    flags = ("_use_min_dim_for_lookup", "_use_block_usage_penalty", "_use_bytes_for_input_read_size")
    return (
        _ann.get_prefetch_compute(config) is None
        and not any(hasattr(config, f) for f in flags)
        and getattr(config, "_input_data_type_size", BIGINT_DTYPE) == BIGINT_DTYPE
        and getattr(config, "_default_output_data_type_size", None) is None
        and type(config).post_process_perfs is HardwarePerfConfig.post_process_perfs
    )


def block_penalty(dim: np.ndarray) -> np.ndarray:
    return np.where(dim >= FULL_BLOCK_EMB_DIM, 1.0, np.where(dim >= 64, HALF_BLOCK_PENALTY, QUARTER_BLOCK_PENALTY))


class CostModel:
    """Per-option perf (6 components) and per-shard storage for one topology."""

    def __init__(self, topology: Topology, config: HardwarePerfConfig) -> None:
        self.topology = topology
        self.config = config
        self.world = topology.world_size
        self.local = topology.local_world_size
        self.group = topology.intra_group_size
        self._device_bw: Dict[Tuple[str, Optional[float], bool], float] = {}
        bw = topology.comms_bandwidths
        ngroups = max(1, self.world // self.group)
        self.bw_a2a = bw.get_bw(world_size=self.world, local_world_size=self.local, collective_type=CollectiveType.ALL_TO_ALL)
        self.bw_rs = bw.get_bw(world_size=self.world, local_world_size=self.local, collective_type=CollectiveType.REDUCE_SCATTER)
        self.bw_ag = bw.get_bw(world_size=self.world, local_world_size=self.local, collective_type=CollectiveType.ALL_GATHER)
        self.bw_ar = bw.get_bw(world_size=self.world, local_world_size=self.local, collective_type=CollectiveType.ALL_REDUCE)
        intra_local = min(self.group, self.local)
        self.bw_group_rs = bw.get_bw(world_size=self.group, local_world_size=intra_local, collective_type=CollectiveType.REDUCE_SCATTER)
        self.bw_group_ag = bw.get_bw(world_size=self.group, local_world_size=intra_local, collective_type=CollectiveType.ALL_GATHER)
        self.num_twrw_groups = ngroups
        self.bw_inter_a2a = (
            bw.get_bw(world_size=ngroups, local_world_size=1, collective_type=CollectiveType.ALL_TO_ALL) if ngroups > 1 else 0.0
        )
        self.bwd_multiplier = config.get_bwd_compute_multiplier(topology.bwd_compute_multiplier)
        self.weighted_bwd_multiplier = config.get_weighted_feature_bwd_compute_multiplier(
            topology.weighted_feature_bwd_compute_multiplier
        )
        self.weighted_kernel_multiplier = config.coefficients.weighted_kernel_multiplier

    def device_bw(self, kernel: str, caching_ratio: Optional[float], prefetch_pipeline: bool) -> float:
        key = (kernel, caching_ratio, prefetch_pipeline)
        if key not in self._device_bw:
            t = self.topology
            bw = self.config.get_device_bw(
                t.compute_device, kernel, t.hbm_mem_bw, t.ddr_mem_bw, t.ssd_mem_bw, t.hbm_to_ddr_mem_bw,
                caching_ratio, prefetch_pipeline,
            )
            self._device_bw[key] = float(bw)
        return self._device_bw[key]

    def _device_bws(self, tables: List[TableInfo], opt_table: np.ndarray, opt_kernel: np.ndarray) -> np.ndarray:
        """`device_bw` of each option: per kernel, looked up by its table's cache settings."""
        settings: Dict[Tuple[Optional[float], bool], int] = {}
        setting = np.array([settings.setdefault((t.cache_load_factor, t.prefetch_pipeline), len(settings)) for t in tables],
                           dtype=np.int64)[opt_table]
        out = np.empty(len(opt_table))
        todo = np.ones(len(opt_table), dtype=bool)
        while todo.any():
            kernel = opt_kernel[np.argmax(todo)]
            sel = opt_kernel == kernel
            out[sel] = np.array([self.device_bw(kernel, *s) for s in settings])[setting[sel]]
            todo &= ~sel
        return out

    # ---- perf -------------------------------------------------------------------------------
    def perf(self, tables: List[TableInfo], opt_table: np.ndarray, opt_type: np.ndarray,
             opt_kernel: np.ndarray, opt_dim: np.ndarray) -> np.ndarray:
        """Perf components (n_options x 6) of one shard of each option; all shards of an option cost the same."""
        W = float(self.world)
        G = float(self.group)
        t_in = np.array([t.batch_inputs for t in tables], dtype=float)[opt_table]
        t_out = np.array([t.batch_outputs for t in tables], dtype=float)[opt_table]
        ts = np.array([t.element_size for t in tables], dtype=float)[opt_table]
        weighted = np.array([t.is_weighted for t in tables])[opt_table]
        pooled = np.array([t.is_pooled for t in tables])[opt_table]
        comm = np.array([t.comm_data_type_sizes() for t in tables], dtype=float).reshape(-1, 4)[opt_table]
        fa2a, ba2a, fsr, bsr = comm.T
        rows = np.array([t.rows for t in tables], dtype=float)[opt_table]
        dbw = self._device_bws(tables, opt_table, opt_kernel)
        dim = opt_dim.astype(float)
        out = np.zeros((len(opt_table), 6))
        wmul = np.where(weighted, 2.0, 1.0)

        def finish(sel, input_read, lookup, fwd_out, penalty, fwd_comms, bwd_comms, input_dist):
            fwd = (input_read + lookup + fwd_out) * penalty / dbw[sel]
            bwd = fwd * self.bwd_multiplier
            bwd = np.where(weighted[sel], bwd * self.weighted_bwd_multiplier, bwd)
            bwd = bwd + np.where(weighted[sel], fwd * self.weighted_kernel_multiplier, 0.0)
            out[sel, 0] = fwd
            out[sel, 1] = fwd_comms
            out[sel, 2] = bwd
            out[sel, 3] = bwd_comms
            out[sel, 5] = input_dist

        def input_dist(sel):
            return np.ceil(t_in[sel] * W * BIGINT_DTYPE) / self.bw_a2a

        # table-wise family: TW, CW, TWCW
        sel = np.isin(opt_type, (TW, CW, TWCW))
        if sel.any():
            d = dim[sel]
            ir = np.ceil(t_in[sel] * W * BIGINT_DTYPE) * wmul[sel]
            lookup = t_in[sel] * W * np.maximum(d, 32.0) * ts[sel]
            f_out = t_out[sel] * W * d * fa2a[sel]
            b_out = t_out[sel] * W * d * ba2a[sel]
            finish(sel, ir, lookup, f_out, block_penalty(d), f_out / self.bw_a2a, b_out / self.bw_a2a, input_dist(sel))

        # row-wise: inputs split over all ranks, outputs reduce-scattered when pooled
        sel = opt_type == RW
        if sel.any():
            d, p = dim[sel], pooled[sel]
            per = t_in[sel] / W
            ir = np.ceil(per * W * BIGINT_DTYPE) * wmul[sel]
            lookup = t_in[sel] / W * W * d * ts[sel]
            outputs = np.where(p, t_out[sel], t_out[sel] / W)
            f_out = outputs * W * d * np.where(p, fsr[sel], fa2a[sel])
            b_out = outputs * W * d * np.where(p, bsr[sel], ba2a[sel])
            bwd_comms = b_out / self.bw_ag + b_out * BATCHED_COPY_PERF_FACTOR / dbw[sel]
            finish(sel, ir, lookup, f_out, 1.0, f_out / self.bw_rs, bwd_comms, input_dist(sel))

        # table-row-wise: row-split inside a group, then all-to-all between groups
        sel = opt_type == TWRW
        if sel.any():
            d, p = dim[sel], pooled[sel]
            ir = np.ceil(t_in[sel] / G * W * BIGINT_DTYPE) * wmul[sel]
            lookup = t_in[sel] / G * W * d * ts[sel]
            outputs = np.where(p, t_out[sel], t_out[sel] / G)
            f_out = outputs * W * d * fsr[sel]
            b_out = outputs * W * d * bsr[sel]
            ng = self.num_twrw_groups
            inter_f = inter_b = 0.0
            if ng > 1:
                inter_f = t_out[sel] * ng * d * fa2a[sel] / self.bw_inter_a2a
                inter_b = t_out[sel] * ng * d * ba2a[sel] / self.bw_inter_a2a
            fwd_comms = f_out / self.bw_group_rs + inter_f
            bwd_comms = inter_b + b_out / self.bw_group_ag + b_out * BATCHED_COPY_PERF_FACTOR / dbw[sel]
            finish(sel, ir, lookup, f_out, 1.0, fwd_comms, bwd_comms, input_dist(sel))

        # data-parallel: local lookups, gradients all-reduced
        sel = opt_type == DP
        if sel.any():
            d = dim[sel]
            ir = np.ceil(t_in[sel] * BIGINT_DTYPE) * wmul[sel]
            lookup = t_in[sel] * d * ts[sel]
            f_out = t_out[sel] * d * ts[sel]
            table_size = rows[sel] * d * ts[sel]
            nodes = min(W / self.local, 2)
            all_reduce = table_size * (2 * nodes - 1) / nodes / self.bw_ar if self.bw_ar > 0 else 0.0 * table_size
            if self.world > 2 * self.local:
                all_reduce = all_reduce * 2
            bwd_comms = all_reduce + table_size * DP_ELEMENTWISE_KERNELS_PERF_FACTOR / dbw[sel]
            finish(sel, ir, lookup, f_out, 1.0, 0.0, bwd_comms, 0.0)
        return out

    # ---- storage ----------------------------------------------------------------------------
    def storage(self, tables: List[TableInfo], shard_table: np.ndarray, shard_type: np.ndarray,
                shard_kernel: np.ndarray, shard_rows: np.ndarray, shard_cols: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(hbm, ddr) bytes of every shard."""
        device = self.topology.compute_device
        W = float(self.world)
        G = float(self.group)
        rows = np.array([t.rows for t in tables], dtype=np.int64)[shard_table]
        dim = np.array([t.dim for t in tables], dtype=np.int64)[shard_table]
        ts = np.array([t.element_size for t in tables], dtype=np.int64)[shard_table]
        t_in = np.array([t.batch_inputs for t in tables], dtype=float)[shard_table]
        t_out = np.array([t.batch_outputs for t in tables], dtype=float)[shard_table]
        pooled = np.array([t.is_pooled for t in tables])[shard_table]
        ods = np.array([t.output_data_type_size for t in tables], dtype=float)[shard_table]
        clf = np.array(
            [t.cache_load_factor if t.cache_load_factor else UVM_CACHING_RATIO for t in tables], dtype=float
        )[shard_table]
        opt_mult = np.array([_optimizer_multiplier(t) for t in tables], dtype=float)[shard_table]

        full = rows * dim * ts
        on_ddr = np.isin(shard_kernel, ("fused_uvm", "fused_uvm_caching")) | (device == "cpu")
        ddr_full = np.where(on_ddr, full, 0)
        hbm_full = np.where(on_ddr, 0, full)
        cached = shard_kernel == "fused_uvm_caching"
        hbm_full = np.where(cached, np.rint(ddr_full * clf).astype(np.int64), hbm_full)

        shard_numel = shard_rows * shard_cols
        numel = rows * dim
        is_dp = shard_type == DP
        hbm_tensor = np.where(is_dp, hbm_full, _ceil_ratio(hbm_full, shard_numel, numel))
        ddr_tensor = np.where(is_dp, ddr_full, _ceil_ratio(ddr_full, shard_numel, numel))
        aux = np.where(cached, np.ceil(shard_rows * (4 + clf * 16)), 0).astype(np.int64)
        hbm_specific = aux + hbm_tensor + np.ceil(hbm_tensor * opt_mult).astype(np.int64)
        ddr_specific = ddr_tensor + np.ceil(ddr_tensor * opt_mult).astype(np.int64)

        # Input/output buffers, as TorchRec sizes them per sharding type.
        colsf = shard_cols.astype(float)
        in_size = np.ceil(t_in * W * BIGINT_DTYPE)
        out_size = np.ceil(t_out * W * colsf * ods)
        sel = is_dp
        in_size[sel] = np.ceil(t_in[sel] * BIGINT_DTYPE)
        out_size[sel] = np.ceil(t_out[sel] * colsf[sel] * ods[sel])
        for st, div in ((RW, W), (TWRW, G)):
            sel = shard_type == st
            per = t_in[sel] / div
            outs = np.where(pooled[sel], t_out[sel], per)
            nonzero = shard_numel[sel] != 0
            in_size[sel] = np.where(nonzero, np.ceil(per * W * BIGINT_DTYPE), 0)
            out_size[sel] = np.where(nonzero, np.ceil(outs * W * colsf[sel] * ods[sel]), 0)
        io = (in_size + out_size).astype(np.int64)
        if device in ("cuda", "mtia"):
            hbm = hbm_specific + io
            ddr = ddr_specific
        else:
            hbm = np.zeros_like(hbm_specific)
            ddr = ddr_specific + io if device == "cpu" else ddr_specific
        return hbm, ddr


def _ceil_ratio(storage: np.ndarray, part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """math.ceil(storage * part / whole) exactly as Python computes it (float division of ints)."""
    prod = storage.astype(float) * part.astype(float)
    out = np.ceil(prod / np.maximum(whole, 1).astype(float)).astype(np.int64)
    inexact = np.nonzero(prod >= _EXACT)[0]
    for i in inexact.tolist():
        out[i] = math.ceil(int(storage[i]) * int(part[i]) / int(whole[i]))
    return out


def _optimizer_multiplier(table: TableInfo) -> float:
    import torch
    import torchrec.optim as trec_optim

    cls = getattr(table.tensor, "_optimizer_classes", [None])[0]
    if not cls or cls in (torch.optim.SGD, trec_optim.SGD):
        return 0.0
    if cls in (torch.optim.Adam, trec_optim.Adam):
        return 2.0
    if cls == trec_optim.RowWiseAdagrad:
        return 1 / table.dim
    return 1.0


def storage_usage_supported(table: TableInfo) -> bool:
    return table.storage_usage_type == StorageUsageType.BASE
