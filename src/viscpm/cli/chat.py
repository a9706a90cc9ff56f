"""``viscpm chat``: one answer, or an interactive conversation whose answers stream."""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ..answer_language import LANGUAGES
from ..pipelines.chat import ContextTooLong, VisCPMChat, append_turn
from ..pipelines.chat_options import ChatOptions
from .options import add_context_budget_option, add_image_checker_option, add_model_options, placement

CHAT_HELP = """Chat about an image, in Chinese or English.

With a question: print one answer. Without: an interactive conversation where answers stream as
they are written. Commands there: `:image PATH` load or switch the image (the conversation is
kept; `:image` alone drops the image), `clear` start over, `stop` or Ctrl-D quit. Ctrl-C stops
the answer being written and keeps the conversation; Ctrl-C twice at the prompt quits. Without an
image the model answers from the text alone (and may describe a scene it cannot see): the chat
says so.

对图片提问（中文或英文）。不带问题时进入多轮对话，回答逐字输出：`:image 路径` 加载或换图（保留对话），
`clear` 清空，`stop` 或 Ctrl-D 退出；Ctrl-C 中断当前回答并保留对话，在提示符处连按两次 Ctrl-C 退出。
未加载图片时模型只根据文字回答（可能臆造画面），对话中会提示。

examples / 示例:
  viscpm chat --image cat.png "What is in the image?"
  viscpm chat --image cat.png "图片里有什么？" --sample --temperature 0.8 --seed 1
  viscpm chat --image cat.png                      # interactive / 多轮对话"""

QUIT_COMMANDS = {"stop", "退出"}
NO_IMAGE_NOTICE = ("no image loaded / 未加载图片: answers come from the text alone and may describe a scene the model "
                   "cannot see / 回答仅依据文字，可能臆造画面")
LOAD_IMAGE_HINT = f"({NO_IMAGE_NOTICE}; load one with / 加载图片: `:image PATH`)"
CLEAR_COMMANDS = {"clear", "清空"}


def add_parser(commands) -> None:
    parser = commands.add_parser("chat", help="chat about an image / 图片对话", description=CHAT_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", help="ask once and exit; omit for an interactive chat")
    parser.add_argument("--image", help="image file (omit for a text-only conversation)")
    add_model_options(parser)
    official = ChatOptions()  # the library's defaults: the official VisCPM-Chat decoding
    decoding = parser.add_argument_group("decoding (defaults: the library's, as in VisCPM)")
    decoding.add_argument("--beams", type=int, default=official.num_beams,
                          help="beam size for one-shot answers (default %(default)s; interactive answers stream "
                               "greedily)")
    decoding.add_argument("--sample", action="store_true", help="sample instead of beam search / greedy")
    decoding.add_argument("--temperature", type=float, default=official.temperature, help="(default %(default)s)")
    decoding.add_argument("--top-p", type=float, default=official.top_p, help="(default %(default)s)")
    decoding.add_argument("--top-k", type=int, default=official.top_k, help="(default %(default)s: off)")
    decoding.add_argument("--seed", type=int, default=official.seed, help="random seed for --sample")
    decoding.add_argument("--max-new-tokens", type=int, default=official.max_new_tokens, metavar="N",
                          help=f"cap the answer at N tokens (default: the official limit, max_length "
                               f"{official.max_length}: at most {official.last_step + 1} tokens)")
    decoding.add_argument("--repetition-penalty", type=float, default=official.repetition_penalty,
                          help="(default %(default)s)")
    decoding.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    add_context_budget_option(decoding)
    decoding.add_argument("--language", choices=(*LANGUAGES, "off"), default=None,
                          help="answer language / 回答语言: auto answers in the question's language (the interactive "
                               "default), zh/en force one, off leaves the model free (the official behaviour; the "
                               "default for one question)")
    add_image_checker_option(parser.add_argument_group("safety"))
    parser.set_defaults(run=run_chat)


def chat_options(args: argparse.Namespace) -> ChatOptions:
    """The turn's options from the flags, built (and checked) once for the whole conversation."""
    # a conversation drifts to the previous turn's language (issue 24), so the interactive chat follows
    # each question's by default; one question keeps the official free choice unless told
    language = args.language or ("off" if args.question is not None else "auto")
    return ChatOptions(num_beams=args.beams, do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed, max_new_tokens=args.max_new_tokens,
                       repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
                       language=None if language == "off" else language)


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    options = chat_options(args)
    chat = VisCPMChat(args.model, args.config, args.vocab, device=args.device, quant=args.quant, **placement(args),
                      image_safety_checker=args.image_checker, max_context_tokens=args.max_context_tokens)
    if args.question is not None:
        if args.image is None:  # on stderr, so a script reading the answer from stdout is unaffected
            print(f"viscpm chat: {NO_IMAGE_NOTICE}; pass --image PATH to ask about an image", file=sys.stderr)
        answer, _, _ = chat.chat(args.image, args.question, options=options)
        print(answer, file=stdout)
        return 0
    return converse(chat, args.image, options, stdin, stdout)


def converse(chat: VisCPMChat, image: str | None, options: ChatOptions, stdin: TextIO, stdout: TextIO) -> int:
    """The interactive conversation (see CHAT_HELP): answers stream; Ctrl-C never ends it by surprise."""
    context, states = "", None
    print("viscpm chat — `:image PATH` 换图 / load an image, `clear` 清空 / reset, `stop` 退出 / quit, "
          "Ctrl-C 中断回答 / interrupt an answer", file=stdout)
    print(f"(image / 图片: {image})" if image else LOAD_IMAGE_HINT, file=stdout)
    interrupted_at_prompt = False
    while True:
        question, pieces = None, []
        try:  # Ctrl-C anywhere in a turn lands below, so it never ends the conversation by surprise
            print("User: ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line or line.strip() in QUIT_COMMANDS:
                print(file=stdout)
                return 0
            interrupted_at_prompt = False
            question = line.strip()
            if not question:
                continue
            if question in CLEAR_COMMANDS:
                context, states = "", None
                print("(conversation cleared / 已清空)", file=stdout)
                continue
            if question.startswith(":image"):
                path = question[len(":image"):].strip() or None
                try:  # encode now, so a bad file is reported at once and the old image stays
                    image, states = path, chat.encode_image(path) if path else None
                    print(f"(image / 图片: {image})" if image else LOAD_IMAGE_HINT, file=stdout)
                except ValueError as error:
                    print(f"error: {error}", file=stdout)
                continue
            if states is None and image is not None:
                states = chat.encode_image(image)
            print("AI: ", end="", file=stdout, flush=True)
            for piece in chat.stream_chat(image, question, context, states, options=options):
                pieces.append(piece)
                print(piece, end="", file=stdout, flush=True)
            print(file=stdout)
            context = append_turn(context, question, "".join(pieces))
        except KeyboardInterrupt:
            if question is None:  # at the prompt: the first Ctrl-C only clears the line
                if interrupted_at_prompt:
                    print(file=stdout)
                    return 0
                interrupted_at_prompt = True
                print("\n(Ctrl-C again or Ctrl-D to quit / 再按 Ctrl-C 或 Ctrl-D 退出)", file=stdout)
                continue
            # an answer (or an image being loaded) stopped: keep what was written, so the conversation reads as
            # the user saw it; stopped before a word, the question is dropped and the conversation stays as it was
            print(" (interrupted / 已中断)", file=stdout)
            if pieces:
                context = append_turn(context, question, "".join(pieces))
        except ContextTooLong as error:  # only a new conversation helps here
            print(f"\nerror: {error}\n(type `clear` to start a new conversation / 输入 clear 开始新对话)", file=stdout)
        except ValueError as error:  # bad image or prompt: say so and keep the conversation
            print(f"\nerror: {error}", file=stdout)
