"""Registration through `sglang.srt.plugins` (with attention/backend.py and memory/radix.py, the
only modules that touch SGLang internals; all three get this process's `session.Session`).

SGLang calls `register()` early in every process it starts (CLI, Engine, scheduler,
detokenizer). It registers:
- in the GPU mode without sgl-kernel (`LSA_SGLANG_GPU_MODE=torch`), the replacements of
  `gpu_mode.patch_sglang`, before SGLang builds a model (stock servers get them too),
- the `lsa` attention backend (lsa_sglang.attention.backend),
- the `lsa` radix cache backend (lsa_sglang.memory.radix),
- hooks: per-request overrides (checked where SGLang checks sampling params, and again when
  the scheduler builds the `Req`), the prefix match of an `attention`-policy prompt stopping
  short of the rows window 0 reads, and a refusal of prompts the host mirror can never hold when a
  `Req` is built, host-mirror admission control in the prefill adder, LSA stats in the
  scheduler's internal state, and capacity: the prefill adder reserves for a running LSA row
  what LSA will really hold (`LSAMemoryManager.decode_need_tokens`, not its remaining
  max_new_tokens), memory LSA gave back reopens admission (SGLang's `batch_is_full` is
  otherwise cleared only when a request leaves the batch), retractions are counted,
- the `GET /lsa/stats` route on SGLang's HTTP app (in the launcher process).
Everything here is idempotent.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing

logger = logging.getLogger(__name__)

BACKEND_NAME = "lsa"
OVERRIDE_KEY = "lsa"  # sampling_params.custom_params["lsa"] = {policy, page_budget, threshold, enabled}
OVERRIDABLE = ("policy", "page_budget", "budget_fraction", "threshold", "enabled", "min_pages", "needle_fallback", "attention_rows",
               "attention_spill", "attention_first_layer", "attention_heads",
               "attention_later", "swap_limit",
               "reselect", "reselect_after",
               "release_copied", "copy_siblings")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from lsa_sglang import gpu_mode
    from lsa_sglang.session import Session

    session = Session.from_environment()
    if gpu_mode.active():
        gpu_mode.patch_sglang()

    @register_attention_backend(BACKEND_NAME)
    def _create_lsa_backend(runner):
        from lsa_sglang.attention.backend import LSAAttnBackend, dense_backend
        from lsa_sglang.session import build_manager

        config = session.serving_config
        dense = dense_backend(runner, session.dense_backend)
        logger.info("lsa attention backend: %s; dense work on %s", config, type(dense).__name__)
        backend = LSAAttnBackend(runner, config, build_manager(runner, config), dense)
        session.attach_manager(backend.manager)
        return backend

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])

    def _radix(ctx):
        from lsa_sglang.memory.radix import create_lsa_radix_cache

        return create_lsa_radix_cache(ctx, session)

    register_radix_cache_backend(BACKEND_NAME, _radix)
    for target, hook, kind in (
        ("sglang.srt.managers.schedule_batch.Req.__init__", _after_req_init, HookType.AFTER),
        ("sglang.srt.managers.scheduler_components.internal_state."
         "SchedulerInternalStateController.get_internal_state", _after_internal_state, HookType.AFTER),
        ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", _around_add_one_req, HookType.AROUND),
        ("sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset",
         _around_running_offset, HookType.AROUND),
        ("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", _around_new_batch_prefill, HookType.AROUND),
        ("sglang.srt.managers.schedule_batch.ScheduleBatch.retract_decode", _after_retract, HookType.AFTER),
        ("sglang.srt.sampling.sampling_params.SamplingParams.verify", _after_sampling_verify, HookType.AFTER),
        ("sglang.srt.managers.schedule_batch.Req._compute_max_prefix_len", _after_max_prefix_len, HookType.AFTER),
    ):
        # each hook gets the session as its first argument
        HookRegistry.register(target, functools.partial(hook, session), kind)
    if multiprocessing.current_process().name == "MainProcess":
        _add_http_routes()
    _registered = True


def parse_overrides(custom_params, base=None) -> dict:
    """`custom_params["lsa"]` -> validated LSAConfig changes (raises LSAConfigError naming the key).

    Each value is checked on its own, then the changes together with `base` (the server's
    config; the defaults when None), so `min_pages` is held against the page budget the request
    will really get."""
    from lsa_sglang.config import (
        MAX_COUNT, LSAConfig, LSAConfigError, budget_from_tokens, show, show_key, with_heads_tuples,
    )

    if not isinstance(custom_params, dict) or OVERRIDE_KEY not in custom_params:
        return {}
    over = custom_params[OVERRIDE_KEY]
    if not isinstance(over, dict):
        raise LSAConfigError(
            f"lsa request override 'lsa': expected a mapping under custom_params['lsa'], got {show(over)}"
        )
    bad = [k for k in over if k not in OVERRIDABLE + ("budget_tokens",)]
    if bad:
        raise LSAConfigError(
            f"lsa request override '{show_key(min(bad, key=show_key))}': not overridable per request; "
            "allowed: " + ", ".join(OVERRIDABLE + ("budget_tokens",))
        )
    base = LSAConfig() if base is None else base
    over = with_heads_tuples(budget_from_tokens(over, base.chunk_size * base.chunks_per_page, "lsa request override"))
    # Values alone: a budget that admits every min_pages and the other way round.
    try:
        merged = base.replace(**{"page_budget": MAX_COUNT, "min_pages": 0, **over})
    except LSAConfigError as e:
        raise LSAConfigError(str(e).replace("lsa config field", "lsa request override", 1)) from None
    inert = merged.inert_error(over)
    if inert:
        raise LSAConfigError("lsa request override " + inert)
    budget = over.get("page_budget", base.page_budget)
    min_pages = over.get("min_pages", base.min_pages)
    if min_pages > budget:
        if "min_pages" in over:
            raise LSAConfigError(
                f"lsa request override 'min_pages': expected an integer <= page_budget ({budget}), got {min_pages}"
            )
        raise LSAConfigError(
            f"lsa request override 'page_budget': expected an integer >= this server's min_pages "
            f"({min_pages}), got {budget}"
        )
    return dict(over)


def _after_sampling_verify(session, result, params, *args, **kwargs):
    """SGLang checks sampling params in the HTTP process before queueing the request; a bad
    `custom_params.lsa` is refused there too (LSAConfigError is a ValueError), so a streamed
    request gets the same 400 naming the key as a plain one, and never reaches the scheduler."""
    if session.config is not None:
        parse_overrides(getattr(params, "custom_params", None), session.config)
    return result


def _after_req_init(session, result, req, *args, **kwargs):
    m = session.manager
    if m is None:
        return result
    from lsa_sglang.config import LSAConfigError

    try:
        over = parse_overrides(getattr(req.sampling_params, "custom_params", None), m.config)
    except LSAConfigError as e:
        req.set_finish_with_abort(str(e))
        return result
    refusal = m.new_request(req, over)
    if refusal is not None:
        req.set_finish_with_abort(refusal)
    return result


def _after_max_prefix_len(session, result, req, input_len, *args, **kwargs):
    """Under the `attention` policy window 0 reads the queries of the prompt's last
    `attention_rows` tokens, which only a prefill computes: the prefix cache may serve every
    token but those, so a prompt found in the cache is scored exactly like a cold one."""
    m = session.manager
    rows = 0 if m is None else m.query_rows(req.rid)
    return max(min(result, input_len - rows), 0) if rows > 1 else result


def _around_add_one_req(session, original, adder, req, *args, **kwargs):
    """A request whose host mirror would not fit now waits in the queue (never OOM)."""
    m = session.manager
    if m is not None and not m.try_reserve(req.rid, len(req.origin_input_ids)):
        from sglang.srt.managers.schedule_policy import AddReqResult

        m.note_host_wait(req.rid)
        return AddReqResult.OTHER
    result = original(adder, req, *args, **kwargs)
    if m is not None and req not in adder.can_run_list and getattr(adder, "new_chunked_req", None) is not req:
        m.unreserve(req.rid)
    return result


def _around_running_offset(session, original, adder, req, *args, **kwargs):
    """Decode tokens the adder keeps free for a running request: for an LSA row, the bound
    on what it may still add to the device (its resident budget, not its sequence)."""
    m = session.manager
    need = None if m is None else m.decode_need_tokens(req)
    return original(adder, req, *args, **kwargs) if need is None else need


def _around_new_batch_prefill(session, original, scheduler, running_batch, *args, **kwargs):
    """Memory LSA returned since the last pass lets the adder try the queue again. It only
    clears SGLang's 'a prefill did not fit' flag: the adder still checks free + evictable
    memory against every running request's reservation, and sets the flag again if short."""
    m = session.manager
    if m is not None and m.take_returned_memory():
        running_batch.batch_is_full = False
    return original(scheduler, running_batch, *args, **kwargs)


def _after_retract(session, result, *args, **kwargs):
    m = session.manager
    if m is not None:
        m.server.retracted_requests += len(result[0])
    return result


def _after_internal_state(session, result, *args, **kwargs):
    m = session.manager
    if m is not None:
        result.internal_state["lsa"] = m.stats()
    return result


def _add_http_routes() -> None:
    try:
        from fastapi.responses import JSONResponse
        from sglang.srt.entrypoints import http_server
    except Exception:  # an SGLang process without the HTTP server
        return

    async def lsa_stats():
        states = await http_server._global_state.tokenizer_manager.get_internal_state()
        lsa = [s.get("lsa") for s in states if s.get("lsa") is not None]
        if not lsa:
            return JSONResponse({"error": "the lsa attention backend is not active"}, status_code=404)
        return JSONResponse(lsa[0] if len(lsa) == 1 else {"ranks": lsa})

    if not any(getattr(r, "path", None) == "/lsa/stats" for r in http_server.app.routes):
        http_server.app.add_api_route("/lsa/stats", lsa_stats, methods=["GET"])


def is_registered() -> bool:
    return _registered
