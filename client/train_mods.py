"""The privacy mods around the train handler, Flower's own where Flower has one (PRIVACY.md).

Outermost first (client_app.train_mods puts them in this order, each on only when the client's own
settings ask for it, so a client configured for DP refuses a message that lacks the clip norm):
1. `secaggplus_mod` (secagg): Flower's SecAgg+ client; runs the 4 protocol stages and masks the reply.
2. `legacy_fit_mod` (secagg): SecAgg+ hands over Flower's legacy fit message (fitins.*) and wants a legacy
   fit reply (fitres.*). This adapter gives the handler below a Message-API train message (one ArrayRecord,
   one ConfigRecord, as always) and returns the **delta** it trained, with num_examples = 1: SecAgg+
   quantizes values in +-clipping_range, and a delta of L2 norm <= C has every value in +-C.
3. `fixedclipping_mod` (dp=user or secagg): Flower's; clips the update (returned minus received arrays)
   to the L2 norm the server sends (clipping_norm in the train config).
4. `public_metrics_mod` (dp or secagg): equal weights (num-examples = 1) and, in DP mode, only metrics that
   are costs rather than statistics of the client's data.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedhydra.common import protocol as p
from fedhydra.common.protocol import ARRAY_NAMES, PUBLIC_TRAIN_METRICS

# PUBLIC_TRAIN_METRICS: what a DP client's train reply may still say (costs and weights, not statistics of its
# data) and "dp-..." privacy reports (record mode's accountant), public by design. Everything else (loss,
# accuracy, example and user counts) is dropped; the privacy statement lists what remains as not covered.


def public_metrics_mod(msg: Message, context: Context, call_next, dp: bool = True) -> Message:
    """num-examples = 1 (equal weights: DP's sensitivity bound and SecAgg+'s max_weight = 1 need them), and
    with `dp` only PUBLIC_TRAIN_METRICS and "dp-..." keys."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    for name, record in list(reply.content.metric_records.items()):
        kept = {k: v for k, v in record.items() if not dp or k in PUBLIC_TRAIN_METRICS or k.startswith(p.DP_PREFIX)}
        reply.content.metric_records[name] = MetricRecord(kept | {p.NUM_EXAMPLES: 1})
    return reply


def legacy_fit_mod(msg: Message, context: Context, call_next) -> Message:
    """SecAgg+'s legacy fit message in, the train handler's Message-API reply turned into a legacy fit reply
    whose parameters are the clipped delta (num_examples = 1)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = str(config.pop(ARRAY_NAMES, "")).split("\n")
    sent = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(sent):
        raise ValueError(f"a SecAgg+ fit message carries {len(sent)} arrays but names {len(names)}")
    msg.content = RecordDict({p.ARRAYS: p.array_record(dict(zip(names, sent))), p.CONFIG: ConfigRecord(config)})
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(f"training failed under SecAgg+: {reply.error.reason}")
    trained = reply.content[p.ARRAYS]
    if list(trained.keys()) != names:
        raise ValueError("the train reply's arrays are not the ones the SecAgg+ fit message carried")
    delta = [trained[k].numpy() - v for k, v in zip(names, sent)]
    metrics = dict(next(iter(reply.content.metric_records.values())))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(delta), 1, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
