"""The `lsa` attention backend: LSA decode rows through LSA, everything dense through the
backend SGLang would use on the device.

Composition, not inheritance: `LSAAttnBackend` holds a dense backend (`dense_backend`: on CPU
SGLang's torch-native backend with a prefix-aware extend, on CUDA SGLang's Triton backend, or any
registered backend the launcher names) and hands it prefill, extend and every decode step in which
no row has LSA on, so a server with LSA off, or a request that turns it off, runs exactly the
dense backend's kernels (gate-off exact). Only decode steps with LSA rows read through LSA: per
request only the positions its chunk table lists as resident (sink, selected chunks, recency tail
and the not-yet-mirrored tail), through one dispatch point:
- `torch` (and `auto` without CUDA): SDPA over the gathered slots, so a request whose every chunk
  is resident gets exactly stock `torch_native` numerics;
- `triton` / `flashinfer` (and `auto` on CUDA): `lsa_sglang.kernels.sparse_decode` over the
  resident pages (CSR page lists, last page partial); a row with LSA off in such a step reads
  all of its pages.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention

from lsa_sglang.config import LSAConfig
from lsa_sglang.kernels import DecodePlan, as_pages, resident_mask_from_sets, sparse_decode


class DenseTorchNative(TorchNativeAttnBackend):
    """SGLang's torch-native backend whose extend attends only a resumed request's new tokens."""

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                 seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=None,
                                 scaling=None, enable_gqa=False, causal=False, is_cross_attn=False,
                                 sliding_window_size=None):
        """Dense prefill. SGLang's torch-native extend pads the query to the whole sequence, so
        a request resuming from a cached prefix pays attention over prefix x prefix again;
        here its new tokens alone attend, under a causal mask shifted by the prefix. A request
        without a cached prefix runs exactly as SGLang runs it."""
        prefixes = extend_prefix_lens.tolist()
        windowed = sliding_window_size is not None and sliding_window_size > -1
        if encoder_lens is not None or not causal or is_cross_attn or windowed or not any(prefixes):
            return super()._run_sdpa_forward_extend(
                query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling,
                enable_gqa=enable_gqa, causal=causal, is_cross_attn=is_cross_attn,
                sliding_window_size=sliding_window_size,
            )
        start = 0
        for idx, n_q, n_prefix, n_kv in zip(req_pool_indices.tolist(), extend_seq_lens.tolist(),
                                            prefixes, seq_lens.tolist()):
            q = query[start : start + n_q].movedim(0, 1).unsqueeze(0)  # [1, H, n_q, D]
            slots = req_to_token[idx, :n_kv]
            k = k_cache[slots].movedim(0, 1).unsqueeze(0).to(q.dtype)
            v = v_cache[slots].movedim(0, 1).unsqueeze(0).to(q.dtype)
            if n_prefix:
                pos = torch.arange(n_kv, device=q.device)
                mask = pos[None, :] <= (n_prefix + torch.arange(n_q, device=q.device))[:, None]
                out = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa, scale=scaling)
            else:
                out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa, scale=scaling)
            output[start : start + n_q] = out[0].movedim(1, 0)
            start += n_q
        return output


def default_dense_backend(device) -> str:
    """The dense backend when the launcher names none: SGLang's torch-native backend on CPU (the
    CPU engine's backend here), its Triton backend on CUDA (needs neither sgl-kernel nor FlashInfer)."""
    return "triton" if torch.device(device).type == "cuda" else "torch_native"


def dense_backend(model_runner, name: str | None = None) -> AttentionBackend:
    """The backend LSA hands dense work to: `name` from SGLang's registry (None: the default for
    the runner's device); `torch_native` is the prefix-aware `DenseTorchNative`."""
    name = name or default_dense_backend(model_runner.device)
    if name == "torch_native":
        return DenseTorchNative(model_runner)
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    if name == "lsa" or name not in ATTENTION_BACKENDS:
        choices = ", ".join(sorted(n for n in ATTENTION_BACKENDS if n != "lsa"))
        raise ValueError(f"lsa dense backend {name!r}: not an SGLang attention backend here (one of {choices})")
    return ATTENTION_BACKENDS[name](model_runner)


# What SGLang calls on a backend besides metadata and forward (CUDA graphs, Triton support):
# the dense backend's answer.
_DELEGATED = (
    "init_cuda_graph_state", "init_forward_metadata_out_graph", "init_forward_metadata_in_graph",
    "get_cuda_graph_seq_len_fill_value", "on_after_cuda_graph_warmup", "support_triton",
    "init_forward_metadata_for_breakable_cuda_graph_capture",
    "prepare_forward_metadata_for_breakable_cuda_graph_replay",
)


class LSAAttnBackend(AttentionBackend):
    def __init__(self, model_runner, config: LSAConfig, manager, dense: AttentionBackend) -> None:
        """`manager`: the session's LSAMemoryManager (None: a model LSA cannot serve, all dense);
        `dense`: the backend every dense step goes to (`dense_backend`)."""
        self.dense = dense
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.config = config
        self.manager = manager
        self._tables: list | None = None  # per request of the current decode batch
        self._extend_rows = None
        self._read: list[torch.Tensor | None] = []
        self._csr = None

    def __getattr__(self, name: str):
        """Attributes LSA does not define are the dense backend's."""
        dense = self.__dict__.get("dense")
        if dense is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(dense, name)

    # -- per forward -----------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch) -> None:
        self.dense.init_forward_metadata(forward_batch)
        self._tables = None
        self._extend_rows = None
        if self.manager is None:
            return
        capture = self.manager.capture
        capture.commit()
        idxs = forward_batch.req_pool_indices.tolist()
        mode = forward_batch.forward_mode
        if mode.is_decode():
            seq_lens = forward_batch.seq_lens.tolist()
            rids = forward_batch.rids or [str(i) for i in idxs]
            tables = self.manager.prepare_decode(idxs, seq_lens, rids)
            if any(t is not None for t in tables):
                self._tables = tables
                self._plan(forward_batch, tables, idxs, seq_lens)
            capture.expect(idxs, list(range(len(idxs))))
        elif mode.is_extend():
            lens = forward_batch.extend_seq_lens.tolist()
            ends = torch.cumsum(forward_batch.extend_seq_lens, 0) - 1
            capture.expect(idxs, ends.tolist())
            # the last prompt rows' queries (window 0 of the `attention` policy)
            rids = forward_batch.rids or [str(i) for i in idxs]
            wants = [self.manager.query_rows(rid) for rid in rids]
            if any(wants):
                counts = [min(n, w) for n, w in zip(lens, wants)]
                rows = torch.cat([torch.arange(e - c + 1, e + 1) for e, c in zip(ends.tolist(), counts)])
                self._extend_rows = (idxs, rids, rows, counts, wants)

    def _plan(self, forward_batch, tables, idxs, seq_lens) -> None:
        """Once per forward: what each request reads (CSR pages for kernels, else token slots)."""
        self._csr = None
        self._read = []
        if self._use_kernels():
            self._csr = self._plan_pages(forward_batch, tables, seq_lens)
            return
        r2t = self.req_to_token_pool.req_to_token
        for table, idx, seq_len in zip(tables, idxs, seq_lens):
            if table is None:
                self._read.append(r2t[idx, :seq_len])
            else:
                pos = table.read_positions(seq_len, self.config.chunk_size, r2t.device)
                self._read.append(r2t[idx].index_select(0, pos))

    def _plan_pages(self, forward_batch, tables, seq_lens):
        """The kernel path's CSR by tensor ops (kernels.planning), in buffers reused every step:
        the resident mask is built on the host, the page ids are gathered on the device."""
        cs = self.config.chunk_size
        r2t = self.req_to_token_pool.req_to_token
        resident, mirrored = self._resident_mask(tables, -(-max(seq_lens) // cs))
        plan = self._decode_plan_buffers(r2t, cs)
        plan.update(r2t, forward_batch.req_pool_indices, torch.tensor(seq_lens), resident, mirrored)
        return tuple(plan.csr())

    @staticmethod
    def _resident_mask(tables, num_chunks: int):
        """Host ``[B, num_chunks]`` mask of each request's resident mirrored chunks and its
        ``[B]`` mirrored-chunk counts, from the manager's tables (None: dense, reads all)."""
        sets = [() if t is None else t.resident for t in tables]
        mirrored = torch.tensor([0 if t is None else t.mirrored for t in tables], dtype=torch.int64)
        return resident_mask_from_sets(sets, num_chunks), mirrored

    def _decode_plan_buffers(self, r2t, cs: int) -> DecodePlan:
        """One DecodePlan for the backend's life, sized for every row of the request pool."""
        plan = getattr(self, "_decode_plan", None)
        if plan is None:
            plan = DecodePlan(r2t.shape[0], -(-r2t.shape[1] // cs), cs, r2t.device)
            self._decode_plan = plan
        return plan

    def _use_kernels(self) -> bool:
        k = self.config.kernel
        return k in ("triton", "flashinfer") or (k == "auto" and torch.device(self.device).type == "cuda")

    # -- prefill -------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self._extend_rows is not None and not layer.is_cross_attention:
            self.manager.capture.record_queries(
                layer.layer_id, q.view(-1, layer.tp_q_head_num, layer.qk_head_dim), *self._extend_rows, layer.scaling
            )
        return self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    # -- decode ----------------------------------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self._tables is None or layer.is_cross_attention:
            return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, getattr(self.dense, "swa_out_cache_loc", None)), k, v
            )
        q_ = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o_ = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        if self.manager.windows.wants_step_queries:  # re-selection on evidence reads them next step
            self.manager.windows.note_step_queries(layer.layer_id, q_, layer.scaling)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        if self._csr is not None:
            cs = self.config.chunk_size
            indptr, indices, last = self._csr
            sparse_decode(
                q_, as_pages(k_cache, cs), as_pages(v_cache, cs), indptr, indices, last,
                layer.scaling, out=o_, backend=self.config.kernel,
            )
            return o
        gqa = layer.tp_q_head_num != layer.tp_k_head_num
        for i, slots in enumerate(self._read):
            qi = q_[i : i + 1].movedim(0, 1).unsqueeze(0)  # [1, H, 1, D]
            ki = k_cache.index_select(0, slots).movedim(0, 1).unsqueeze(0).to(qi.dtype)
            vi = v_cache.index_select(0, slots).movedim(0, 1).unsqueeze(0).to(qi.dtype)
            out = scaled_dot_product_attention(qi, ki, vi, enable_gqa=gqa, scale=layer.scaling)
            o_[i] = out[0, :, 0, :]
        return o


def _delegate(name: str):
    def method(self, *args, **kwargs):
        return getattr(self.dense, name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"The dense backend's `{name}`."
    return method


for _name in _DELEGATED:
    setattr(LSAAttnBackend, _name, _delegate(_name))
