"""`nora`: call a nora server from the shell.

    nora generate --adapter demo-1 "Once upon a time"     # streams the text to stdout
    nora generate --chat "What is the capital of France?"  # one user message, the answer
    nora chat --system "Be brief."                         # a conversation: one line per turn
    nora adapters list | load ID --path FILE | load ID --file LOCAL_FILE | unload ID
    nora tokenize "some text" ; nora info ; nora health

`nora chat` reads one user message per line from stdin (a terminal or a pipe), streams each
answer to stdout and keeps the whole conversation; it ends at end of input or on "/exit"
("/reset" starts a new conversation). Unset sampling flags take the served model's defaults.

Connection flags go before the command; each has an environment variable (NORA_TARGET,
NORA_AUTH_TOKEN, NORA_ADMIN_TOKEN, NORA_TLS_CA, NORA_TLS_CERT, NORA_TLS_KEY).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from nora_client.client import DEFAULT_TARGET, NoraClient
from nora_proto.v1 import nora_pb2


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="nora", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=env("NORA_TARGET", DEFAULT_TARGET),
                   help=f"server host:port [NORA_TARGET; default: {DEFAULT_TARGET}]")
    p.add_argument("--token", default=env("NORA_AUTH_TOKEN"),
                   help="bearer token [NORA_AUTH_TOKEN]")
    p.add_argument("--admin-token", default=env("NORA_ADMIN_TOKEN"),
                   help="bearer token for adapters load/unload [NORA_ADMIN_TOKEN]")
    p.add_argument("--tls", action="store_true", help="use TLS (system roots, or --tls-ca)")
    p.add_argument("--tls-ca", default=env("NORA_TLS_CA"),
                   help="CA certificate (PEM) [NORA_TLS_CA]")
    p.add_argument("--tls-cert", default=env("NORA_TLS_CERT"),
                   help="client certificate (PEM) for mTLS [NORA_TLS_CERT]")
    p.add_argument("--tls-key", default=env("NORA_TLS_KEY"),
                   help="client key (PEM) for mTLS [NORA_TLS_KEY]")
    p.add_argument("--server-name", help="name to check the server's certificate against")
    p.add_argument("--timeout", type=float, default=None, help="deadline per call, seconds")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streamed)")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message through the chat template")
    g.add_argument("--system", help="with --chat: a system message before it")
    _generation_flags(g)
    g.add_argument("--json", action="store_true",
                   help="print the whole response as JSON instead of streaming text")

    c = sub.add_parser("chat", help="a conversation: a user message per line of stdin")
    c.add_argument("--system", help="a system message that starts the conversation")
    _generation_flags(c, max_new_tokens=CHAT_MAX_NEW_TOKENS)

    t = sub.add_parser("tokenize", help="token ids of a text")
    t.add_argument("text")
    t.add_argument("--chat", action="store_true",
                   help="the chat template's ids of the text as one user message")
    sub.add_parser("info", help="the served model and the server's limits")
    sub.add_parser("health", help="grpc.health.v1 status (exit status 0 if SERVING)")

    ad = sub.add_parser("adapters", help="list, load or unload adapters")
    asub = ad.add_subparsers(dest="action", required=True)
    asub.add_parser("list")
    ld = asub.add_parser("load", help="load or replace an adapter")
    ld.add_argument("adapter_id")
    src = ld.add_mutually_exclusive_group(required=True)
    src.add_argument("--path", help="a file inside the server's adapter store")
    src.add_argument("--file", type=Path, help="a local adapter file, uploaded")
    ul = asub.add_parser("unload")
    ul.add_argument("adapter_id")
    return p


CHAT_MAX_NEW_TOKENS = 512  # an answer's cap in `nora chat` (the server's default, 64, cuts most)


def _generation_flags(p: argparse.ArgumentParser, max_new_tokens: int | None = None) -> None:
    a = p.add_mutually_exclusive_group()
    a.add_argument("--adapter", help="id of a loaded adapter")
    a.add_argument("--adapter-file", type=Path, help="a local adapter file, sent inline")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"default: {max_new_tokens or 'the server default'}")
    p.add_argument("--temperature", type=float, help="0 = greedy; default: the model's")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--time-limit", type=float, help="seconds")
    p.add_argument("--presence-penalty", type=float, help="in [-2, 2] (OpenAI's)")
    p.add_argument("--frequency-penalty", type=float, help="in [-2, 2] (OpenAI's)")
    p.add_argument("--min-p", type=float)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--truncate-input-tokens", type=int, default=0,
                   help="keep only the input's last N tokens")
    f = p.add_mutually_exclusive_group()
    f.add_argument("--json-object", action="store_true", help="answer with a JSON object")
    f.add_argument("--json-schema", type=Path, help="a JSON schema file the answer follows")
    f.add_argument("--regex", help="a regex the whole answer matches")


def _params(args) -> dict:
    params = dict(adapter_id=args.adapter, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                  time_limit=args.time_limit, presence_penalty=args.presence_penalty,
                  frequency_penalty=args.frequency_penalty, min_p=args.min_p,
                  min_new_tokens=args.min_new_tokens,
                  truncate_input_tokens=args.truncate_input_tokens,
                  json_object=args.json_object, regex=args.regex)
    if args.json_schema is not None:
        params["json_schema"] = args.json_schema.read_text()
    if args.adapter_file is not None:
        params["adapter_bytes"] = args.adapter_file.read_bytes()
    return params


def _conversation(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def _finish(last) -> str:
    reason = nora_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_")
    return (f"[{reason.lower()}: {last.usage.prompt_tokens} prompt + "
            f"{last.usage.completion_tokens} generated tokens]"
            + (f" {last.error}" if last.error else ""))


def _json(message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True)


def _generate(nora: NoraClient, args) -> None:
    params = _params(args)
    if args.chat:
        params["messages"] = [*_conversation(args.system),
                              {"role": "user", "content": args.prompt}]
    else:
        params["prompt"] = args.prompt
    if args.json:
        print(_json(nora.generate(**params)))
        return
    last = None
    for last in nora.generate_stream(**params):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    print()
    if last is not None:
        print(_finish(last), file=sys.stderr)


def _read_turn(interactive: bool) -> str | None:
    """The next user line; None at end of input."""
    if interactive:
        try:
            return input("> ")  # readline editing and history where available
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def _chat(nora: NoraClient, args) -> None:
    """The conversation loop: one user line in, the answer streamed out, both kept."""
    params = _params(args)
    interactive = sys.stdin.isatty()
    messages = _conversation(args.system)
    if interactive:
        print("nora chat: a message per line; /reset, /exit or end of input (Ctrl-D)",
              file=sys.stderr)
    while (line := _read_turn(interactive)) is not None:
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = _conversation(args.system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        call = nora.generate_stream(messages=messages, **params)
        parts: list[str] = []
        last = None
        try:
            for last in call:
                parts.append(last.text)
                sys.stdout.write(last.text)
                sys.stdout.flush()
        except KeyboardInterrupt:  # ends this answer, not the conversation
            call.cancel()
            last = None
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:  # e.g. the server is gone
                raise
            print(f"nora: {exc.code().name}: {exc.details()} (message dropped)",
                  file=sys.stderr)
            messages.pop()
            continue
        print()
        if last is None:  # interrupted: the answer is not part of the conversation
            print("[interrupted: message dropped]", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": "".join(parts)})
        if last.finish_reason != nora_pb2.FINISH_REASON_EOS:  # cut short: say why
            print(_finish(last), file=sys.stderr)


def run(args) -> int:
    with NoraClient(args.target, token=args.token, admin_token=args.admin_token, tls=args.tls,
                    ca_cert=args.tls_ca, client_cert=args.tls_cert, client_key=args.tls_key,
                    server_name=args.server_name, timeout=args.timeout) as nora:
        if args.command == "generate":
            _generate(nora, args)
        elif args.command == "chat":
            _chat(nora, args)
        elif args.command == "tokenize":
            ids = (nora.tokenize(messages=[{"role": "user", "content": args.text}])
                   if args.chat else nora.tokenize(args.text))
            print(" ".join(map(str, ids)))
        elif args.command == "info":
            print(_json(nora.model_info()))
        elif args.command == "health":
            status = nora.health()
            print(status)
            return 0 if status == "SERVING" else 1
        elif args.action == "list":
            reply = nora.list_adapters()
            print(f"{reply.slots_used}/{reply.slots_total} slots used")
            for a in reply.adapters:
                print(f"{a.adapter_id}\tslot {a.slot}\t{a.requests} requests\t"
                      f"{a.generated_tokens} tokens\t{a.running_requests} running\t{a.source}")
        elif args.action == "load":
            data = args.file.read_bytes() if args.file is not None else None
            info = nora.load_adapter(args.adapter_id, path=args.path, data=data)
            print(f"loaded {info.adapter_id} into slot {info.slot} ({info.size_bytes} bytes)")
        else:
            nora.unload_adapter(args.adapter_id)
            print(f"unloaded {args.adapter_id}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    try:
        code = run(args)
    except grpc.RpcError as exc:
        print(f"nora: {exc.code().name}: {exc.details()}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
