"""The `tpi` command's arguments: every subcommand's flags, grouped, with their help and defaults.

Owns: ``build_parser`` and the flag groups the subcommands share (generation, each rank's memory
and GPU options, security, collective); the value sets come from tpi/options.py. Does not know:
what the commands do (launcher/cli.py turns the flags into option objects and runs them).
"""

from __future__ import annotations

import argparse
import os
import sys

from tpi.options import Collective, Compute, DType, OffloadMode, PayloadName, QuantName, choices


class Formatter(argparse.HelpFormatter):
    """Help with each flag's default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"



class _Deprecated(argparse.Action):
    """An old flag that still works: it sets the new flag's value and says so on stderr."""

    def __init__(self, *args, new: str, **kw):
        super().__init__(*args, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_generation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", help="the prompt; rendered with the chat template unless --raw")
    g.add_argument("--system", help="a system message for the chat template")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    g.add_argument("--top-p", type=float, help="sample from the smallest set of tokens reaching probability p")
    g.add_argument("--seed", type=int, help="seed of the sampling, for repeatable output")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, default=3, help="ranks, the master included")
    p.add_argument("--ratios", help="each rank's share of every layer, rank 0 first, e.g. 2,1,1 or 0,1,1 "
                   "(default: equal); a rank with ratio 0 holds no share")
    p.add_argument("--dtype", default="float32", choices=choices(DType), help="the weights' dtype on every rank")
    _add_quant(p)


def _add_quant(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantized weights")
    g.add_argument("--quant", choices=choices(QuantName), default="none",
                   help="none: the checkpoint's own format (a folder's floats, a GGUF file's types); float: "
                   "dequantized to --dtype; int8 / int4: a float checkpoint's projections quantized in groups")
    g.add_argument("--group-size", type=int, default=32, help="input columns per scale with --quant int8/int4")
    g.add_argument("--quant-head", action="store_true",
                   help="quantize the embedding and LM head too (default: they stay in --dtype)")


def _add_rank(p: argparse.ArgumentParser) -> None:
    """This rank's own options (RankOptions), and the timeouts every rank has."""
    g = p.add_argument_group("each rank")
    g.add_argument("--threads", type=int, default=1, help="torch threads per rank process")
    g.add_argument("--max-context", type=int, help="KV cache length (default: min(model max, 4096))")
    g.add_argument("--compute", choices=choices(Compute), help="on quantized weights: exact (float32 "
                   "activations, as the dequantized weights give) or fast (bfloat16 through torch's int4 kernel; "
                   "the default); every rank must use the same")
    g.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per step: the activations every "
                   "rank's memory budget keeps room for; every rank must use the same")
    g.add_argument("--step-timeout", type=float, default=60.0, help="seconds to wait for a peer within a step")
    g.add_argument("--join-timeout", type=float, default=300.0, help="seconds to wait for the cluster to form")
    g.add_argument("--lost-timeout", type=float, default=3.0,
                   help="seconds of silence (heartbeats) after which a peer is declared lost")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-budget", help="this device's memory for tpi, e.g. 800MB, 2GB (10^9) or 2GiB (2^30); "
                   "blocks that do not fit stream from disk (default: everything resident)")
    g.add_argument("--window", type=int, help="streamed blocks held at once, the one loading included "
                   "(default: 2, or 1 if only that fits)")
    g.add_argument("--drop-page-cache", action="store_true",
                   help="drop streamed reads from the page cache (posix_fadvise DONTNEED): measure the disk")
    g.add_argument("--stream-all", action="store_true", help="pin nothing, stream every block (for measuring)")
    g.add_argument("--no-verify", dest="verify_shards", action="store_false", help="skip the sha256 check of "
                   "each rank's shard files at start (sizes and headers are still checked): for very large models")
    g = p.add_argument_group("a GPU (experimental)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: with a GPU, the KV cache and the blocks "
                   "that fit --gpu-memory-budget live on it, and the rest is offloaded (--offload-mode)")
    g.add_argument("--gpu-memory-budget", help="GPU memory for tpi (default: 90%% of what is free)")
    g.add_argument("--offload-mode", choices=choices(OffloadMode), default="blocks",
                   help="how host blocks (those not on the GPU) share it: blocks: attention on the GPU from a copy, "
                   "FFN blocks and LM-head chunks computed by both at once on disjoint columns; rows: every "
                   "projection divided by output rows")
    g.add_argument("--offload-share", type=float, help="the GPU's share of the host blocks: of their bytes "
                   "(blocks) or of each projection's rows (rows); default: measured at start")
    g.add_argument("--split-mode", dest="offload_mode", action=_Deprecated, new="--offload-mode",
                   choices=choices(OffloadMode), help=argparse.SUPPRESS)
    g.add_argument("--split-ratio", dest="offload_share", type=float, action=_Deprecated, new="--offload-share",
                   help=argparse.SUPPRESS)


def _add_keys(p: argparse.ArgumentParser, role: str) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--curve-key", help="this node's key file from `tpi keys`: encrypt and authenticate the links")
    if role == "worker":
        g.add_argument("--master-key", help="the master's public key (with --curve-key)")
    else:
        g.add_argument("--allow-key", action="append", default=[],
                       help="a worker's public key allowed to join (repeatable, with --curve-key)")
    g.add_argument("--insecure", action="store_true",
                   help="allow plain TCP between machines (anyone on the network can read and inject)")


def _add_collective(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("collective")
    g.add_argument("--collective", default="star", choices=choices(Collective),
                   help="the allreduce: star, ring, tree, gloo, or auto (chosen from the links measured at start)")
    g.add_argument("--payload", choices=choices(PayloadName),
                   help="partial sums on the wire (default: the model's dtype); q8: int8 with a scale per 32 values")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpi", description="tensor-parallel inference on small devices")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="exit when stdin closes (how `tpi launch` ties remote processes to itself)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="split a HF checkpoint folder or a .gguf file into per-rank block files",
                       formatter_class=Formatter)
    p.add_argument("model_dir", metavar="MODEL", help="a Hugging Face checkpoint folder or a .gguf file")
    p.add_argument("out_dir")
    p.add_argument("--world-size", type=int, required=True, help="ranks, the master included")
    p.add_argument("--ratios", help="per-rank shares, rank 0 first, e.g. 3,1,1 (default: equal)")
    p.add_argument("--dtype", default="float32", choices=choices(DType))
    _add_quant(p)

    p = sub.add_parser("worker", help="run one worker rank that connects to a master", formatter_class=Formatter)
    p.add_argument("--master", required=True, help="the master's address, tcp://HOST:PORT")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--shards", help="a folder written by `tpi split` (default: fetch this rank's shards from "
                   "the master and keep them in --cache-dir)")
    p.add_argument("--cache-dir", help="where fetched shards are kept (default: $TPI_CACHE/fetched/rank<R>)")
    p.add_argument("--collective", choices=choices(Collective),
                   help="default: whatever the master runs; star: open no port for a ring or tree; others: refuse "
                   "a master that runs another")
    p.add_argument("--collective-host", help="the address other workers reach this one at, for a ring or tree "
                   "(default: this machine's address on its route to the master)")
    _add_rank(p)
    _add_keys(p, "worker")

    p = sub.add_parser("keys", help="make this node's CURVE key pair and print its public key",
                       formatter_class=Formatter)
    p.add_argument("--name", default="node", help="the node's name in the cluster config: master, worker1, ...")
    p.add_argument("--dir", default="~/.config/tpi/keys", help="where to write NAME.key")
    p.add_argument("--force", action="store_true", help="replace an existing key file")

    p = sub.add_parser("launch", help="start a cluster config's master here and its workers over ssh")
    p.add_argument("config", help="a cluster config, e.g. cluster_configs/home-4.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the command for each machine and exit")

    p = sub.add_parser("emulate", help="run a cluster config on this machine in network namespaces with "
                       "its link's delay and rate (root and iproute2)", formatter_class=Formatter)
    p.add_argument("config", help="a cluster config, e.g. cluster_configs/compose-4.yaml")
    p.add_argument("--subnet", help="the emulated network (default: the first free 10.77.N.0/24)")
    p.add_argument("--delay-mode", default="auto", choices=["auto", "netem", "proxy"],
                   help="netem where the kernel has it (auto), or tpi's own delay proxy")

    p = sub.add_parser("master", help="run rank 0: wait for the workers, then answer prompts",
                       formatter_class=Formatter)
    p.add_argument("--shards", required=True, help="the folder written by `tpi split`")
    p.add_argument("--bind", default="tcp://0.0.0.0:5555", help="where workers connect")
    _add_rank(p)
    _add_keys(p, "master")
    _add_collective(p)
    _add_generation(p)

    p = sub.add_parser("run", help="split (cached), start master and workers on this machine, generate, stop",
                       formatter_class=Formatter)
    p.add_argument("--model", help="a HF checkpoint folder or a .gguf file, or embedded-gguf: the embedded "
                   "model's own 4-bit GGUF (default: the embedded SmolLM2-135M-Instruct in float32)")
    _add_model(p)
    _add_generation(p)
    p.add_argument("--stats", action="store_true", help="print per-rank time and memory figures at the end")
    _add_rank(p)
    _add_collective(p)

    p = sub.add_parser("serve", help="run the master with an OpenAI-compatible HTTP API", formatter_class=Formatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a HF checkpoint folder or a .gguf file, or embedded-gguf: the embedded "
                     "model's own 4-bit GGUF (default: the embedded SmolLM2-135M-Instruct in float32)")
    src.add_argument("--shards", help="a folder written by `tpi split` (instead of --model)")
    _add_model(p)
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="HTTP address (127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one")
    g.add_argument("--api-key", default=os.environ.get("TPI_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $TPI_API_KEY, else none)")
    g.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    g.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more get 429")
    p.add_argument("--wait-for-workers", action="store_true",
                   help="do not start workers here: wait for `tpi worker` processes on other machines")
    p.add_argument("--bind", default="tcp://0.0.0.0:5555", help="where workers connect with --wait-for-workers")
    _add_rank(p)
    _add_keys(p, "master")
    _add_collective(p)

    p = sub.add_parser("chat", help="chat in the terminal with any OpenAI-compatible server",
                       formatter_class=Formatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model id (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("TPI_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--system", help="a system message")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512)
    return parser
