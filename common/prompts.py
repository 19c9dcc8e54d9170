"""Chat messages for the black-box LLM: zero-shot, and k-shot with a user's profile items.

Three ways to show profile items (MEASUREMENTS.md measured them on LaMP-7 with SmolLM2):
- "system": the items as examples in a system message, then the query (LaMP-7: 0.335 ROUGE-1,
  the best measured, vs 0.331 zero-shot);
- "chat": HYDRA's released format, each item as a user turn (its instruction) and an assistant
  turn (its answer), then the query (LaMP-7 needs a pseudo-input per tweet: 0.249);
- "lamp": LaMP's own RAG string before the input (LaMP-7: 0.195; it makes a small model
  rewrite the examples).
`DEFAULT_STYLE` keeps the best measured format per task; README "Results" has the figures.
"""

from __future__ import annotations

from .tasks import Task

STYLES = ("system", "chat", "lamp")
DEFAULT_STYLE = {"LaMP_7": "system", "LaMP_4": "system", "LaMP_5": "system"}  # others: "chat"

PSEUDO_INPUT = "pseudo_input"  # an item key holding an input made for items that have none (LaMP-7)


def default_style(task: Task) -> str:
    return DEFAULT_STYLE.get(task.name, "chat")


def zero_shot(task: Task, task_input: str) -> list[dict]:
    """The input alone: LaMP inputs already carry the instruction (applied once, HYDRA.md §5.1)."""
    return [{"role": "user", "content": task_input}]


def _system_text(task: Task, items: list[dict]) -> str:
    if task.kind == "generation":
        what = "tweets" if task.name == "LaMP_7" else "titles"
        lines = [f'- "{task.item_answer(i)}"' if task.label_field is None
                 else f'- "{task.item_answer(i)}" for: {task.item_text(i)}' for i in items]
        return f"You write {what} in this user's style. Examples of this user's {what}:\n" + "\n".join(lines)
    lines = [f"- {task.item_text(i)} -> {task.item_answer(i)}" for i in items]
    return "Answer as this user does. This user's past answers:\n" + "\n".join(lines)


def _item_turn(task: Task, item: dict) -> str:
    if task.label_field is None:
        if PSEUDO_INPUT not in item:
            raise ValueError(f"{task.name}: the 'chat' style needs a {PSEUDO_INPUT!r} for profile item {item.get('id')}")
        return task.instruction(item[PSEUDO_INPUT])
    return task.instruction(task.item_text(item))


def with_items(task: Task, task_input: str, items: list[dict], style: str | None = None) -> list[dict]:
    """The input with `items` (best first) shown in `style`; no items gives the zero-shot prompt."""
    style = style or default_style(task)
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(STYLES)}")
    if not items:
        return zero_shot(task, task_input)
    if style == "system":
        return [{"role": "system", "content": _system_text(task, items)}, {"role": "user", "content": task_input}]
    if style == "chat":
        turns: list[dict] = []
        for item in items:
            turns += [{"role": "user", "content": _item_turn(task, item)},
                      {"role": "assistant", "content": task.item_answer(item)}]
        return turns + [{"role": "user", "content": task_input}]
    examples = ", and ".join(task.rag_example(i).strip() for i in items)
    return [{"role": "user", "content": task.rag_join.format(examples=examples, input=task_input)}]
