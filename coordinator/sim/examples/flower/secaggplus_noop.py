"""Flower 1.42 SecAgg+ on a noop task, timed in one process.

Runs Flower's own SecAgg+ (`SecAggPlusWorkflow` on the server side, `secaggplus_mod`
on every client) inside `DefaultWorkflow` with FedAvg, exactly as a Flower ServerApp
and ClientApp would, but with a loopback `Grid` that hands a copy of each message (standing for the wire)
straight to the destination node's ClientApp in this process: no network, no
serialisation, no Ray, no SuperLink.
This is the least overhead Flower's protocol code can run with, so the per-round
time it reports is a lower bound for Flower on this machine.

Each client's fit returns `dim` uniform floats in [-1, 1) (seeded per node and round)
with weight 1, like `fedcart-sim --task noop:DIM`.

Usage (outside the repo's Python, see README.md):
    /work/flower-kit/bin/python secaggplus_noop.py --clients 50 --dim 100000 \
        --num-shares 7 --rounds 3
"""

import argparse
import copy
import resource
import time
import uuid

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import ndarrays_to_parameters
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid


class NoopClient(NumPyClient):
    def __init__(self, node_id: int, dim: int):
        self.node_id = node_id
        self.dim = dim
        self.rounds = 0

    def get_parameters(self, config):
        return [np.zeros(self.dim, dtype=np.float32)]

    def fit(self, parameters, config):
        self.rounds += 1
        rng = np.random.default_rng([self.node_id, self.rounds])
        update = rng.uniform(-1.0, 1.0, self.dim).astype(np.float32)
        self.last = update
        return [update], 1, {}


class LoopbackGrid(Grid):
    """Delivers every message to the destination's ClientApp, synchronously."""

    def __init__(self, app: ClientApp, node_ids, dim: int):
        self.app = app
        self.node_ids = list(node_ids)
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
            for nid in self.node_ids
        }
        self.replies = {}
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_src_node_id"] = 0
            # A copy stands for the wire: the client mods consume what they read.
            delivered = copy.deepcopy(msg)
            reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(m) for m in message_ids if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--dim", type=int, default=100_000)
    p.add_argument("--num-shares", type=int, default=7)
    p.add_argument("--threshold", type=float, default=0.5,
                   help="reconstruction threshold as a fraction of num_shares")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    clients = {}

    def client_fn(context: Context):
        nid = context.node_id
        if nid not in clients:
            clients[nid] = NoopClient(nid, a.dim)
        return clients[nid].to_client()

    app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    grid = LoopbackGrid(app, range(1, a.clients + 1), a.dim)
    strategy = FedAvg(
        fraction_fit=1.0,
        min_fit_clients=a.clients,
        min_available_clients=a.clients,
        fraction_evaluate=0.0,
        initial_parameters=ndarrays_to_parameters([np.zeros(a.dim, dtype=np.float32)]),
    )
    round_times = []
    round_cpu = []

    class TimedSecAggPlus(SecAggPlusWorkflow):
        def __call__(self, grid, context):
            start, cpu = time.perf_counter(), time.process_time()
            super().__call__(grid, context)
            round_times.append(time.perf_counter() - start)
            round_cpu.append(time.process_time() - cpu)

    # What the SuperLink's task runner sets before a ServerApp runs.
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(
        context=server_context,
        config=ServerConfig(num_rounds=a.rounds),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=TimedSecAggPlus(
            num_shares=a.num_shares, reconstruction_threshold=a.threshold
        )
    )
    workflow(grid, context)
    # The protocol must have computed the mean of the last round's updates
    # (within Flower's quantisation error, ~2e-3 with its defaults).
    record = context.state.array_records["parameters"]
    got = np.concatenate([a.numpy().ravel() for a in record.values()])
    want = np.mean([c.last for c in clients.values()], axis=0)
    err = float(np.max(np.abs(got - want)))
    assert err < 5e-2, f"SecAgg+ mean is off by {err}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = ", ".join(f"{t:.3f}" for t in round_times)
    after_first = round_times[1:] or round_times
    cpu_after_first = round_cpu[1:] or round_cpu
    print(
        f"flwr SecAgg+ noop clients={a.clients} dim={a.dim} num_shares={a.num_shares}: "
        f"s/round [{times}], mean after the first {sum(after_first) / len(after_first):.3f} "
        f"(CPU {sum(cpu_after_first) / len(cpu_after_first):.3f}), "
        f"peak RSS {peak:.0f} MiB, max |mean error| {err:.1e}"
    )


if __name__ == "__main__":
    main()
