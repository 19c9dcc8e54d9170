"""The LaMP task registry: what each task's data looks like and how its text is made.

Every task knows its profile fields, how to take the content out of an input, how to
turn content back into the task's instruction (applied once: HYDRA's reference code
applies it twice to real queries, HYDRA.md §5.1), its kind, its label set and its
metrics. Inputs and templates are LaMP's own strings (HYDRA.md §5.1; LaMP's data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["classification", "rating", "generation"]

NEWS_CATEGORIES = (
    "women", "religion", "politics", "style & beauty", "entertainment", "culture & arts",
    "sports", "science & technology", "travel", "business", "crime", "education",
    "healthy living", "parents", "food & drink",
)
MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)


@dataclass(frozen=True)
class Task:
    """One LaMP task. `template` holds `{content}`; `marker` is the text after which an input's content starts."""

    name: str
    title: str
    kind: Kind
    template: str
    marker: str
    text_fields: tuple[str, ...]  # profile fields that make an item's text (BM25 corpus, prompts)
    label_field: str | None  # profile field with the item's answer; None: the item text is the answer (LaMP-7)
    labels: tuple[str, ...] = ()  # closed label set of classification and rating tasks
    rag_item: str = ""  # LaMP's own RAG phrasing of one profile item
    rag_join: str = "{examples}. {input}"  # LaMP's own way of putting the items before the input
    # generation: the answer's token budget (fit.answer_tokens); a title needs far fewer than a tweet
    generation_tokens: int = 64

    @property
    def metrics(self) -> tuple[str, ...]:
        return {
            "classification": ("accuracy", "f1"),
            "rating": ("mae", "rmse"),
            "generation": ("rouge-1", "rouge-L", "bleu"),
        }[self.kind]

    @property
    def higher_is_better(self) -> bool:
        """Whether the task's first metric grows with quality (MAE does not)."""
        return self.kind != "rating"

    def content(self, task_input: str) -> str:
        """The content of an input (article, review, tweet...), without the instruction."""
        at = task_input.find(self.marker)
        if at < 0:
            raise ValueError(f"{self.name}: input does not contain {self.marker!r}: {task_input[:80]!r}")
        return task_input[at + len(self.marker):].strip()

    def instruction(self, content: str) -> str:
        """The task's instruction around `content` (the inverse of `content`)."""
        return self.template.format(content=content)

    def item_text(self, item: dict) -> str:
        """A profile item's text: what BM25 indexes and what a prompt shows as the item's input side."""
        return " ".join(str(item[f]).strip() for f in self.text_fields)

    def item_answer(self, item: dict) -> str:
        """A profile item's answer: its label field, or the item text itself for LaMP-7."""
        if self.label_field is None:
            return self.item_text(item)
        return str(item[self.label_field]).strip()

    def rag_example(self, item: dict) -> str:
        """One profile item in LaMP's RAG phrasing."""
        return self.rag_item.format(**{k: str(v).strip() for k, v in item.items()})


def _lamp1_content(task_input: str) -> str:
    quoted = re.findall(r'"([^"]*)"', task_input)
    return " ".join(quoted[1:3]) if len(quoted) >= 3 else task_input


class CitationTask(Task):
    """LaMP-1 inputs hold a title and two references; its content is the two reference titles (LaMP's BM25 query)."""

    def content(self, task_input: str) -> str:
        return _lamp1_content(task_input)

    def instruction(self, content: str) -> str:
        raise NotImplementedError("LaMP_1 inputs cannot be rebuilt from their content; use the original input")


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        CitationTask(
            name="LaMP_1", title="personalized citation identification", kind="classification",
            template="{content}", marker="",
            text_fields=("title",), label_field=None, labels=("[1]", "[2]"),
            rag_item='"{title}"', rag_join="{examples}. {input}",
        ),
        Task(
            name="LaMP_2N", title="personalized news categorization", kind="classification",
            template=(
                "Which category does this article relate to among the following categories? Just answer "
                "with the category name without further explanation. categories: [" + ", ".join(NEWS_CATEGORIES)
                + "] article: {content}"
            ),
            marker="article:", text_fields=("text",), label_field="category", labels=NEWS_CATEGORIES,
            rag_item='the category for the article: "{text}" is "{category}" ',
        ),
        Task(
            name="LaMP_2M", title="personalized movie tagging", kind="classification",
            template=(
                "Which tag does this movie relate to among the following tags? Just answer with the tag name "
                "without further explanation. tags: [" + ", ".join(MOVIE_TAGS) + "] description: {content}"
            ),
            marker="description:", text_fields=("description",), label_field="tag", labels=MOVIE_TAGS,
            rag_item='the tag for the movie: "{description}" is "{tag}" ',
        ),
        Task(
            name="LaMP_3", title="personalized product rating", kind="rating",
            template=(
                "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
                "or 5 without further explanation. review: {content}"
            ),
            marker="review:", text_fields=("text",), label_field="score", labels=("1", "2", "3", "4", "5"),
            rag_item='{score} is the score for "{text}" ',
        ),
        Task(
            name="LaMP_4", title="personalized news headline generation", kind="generation",
            template="Generate a headline for the following article: {content}",
            marker="article:", text_fields=("text",), label_field="title",
            rag_item='"{title}" is the title for "{text}" ',
            # Amazon review titles in LaMP-4 format: 99.9% have at most 20 words, the longest 25 (~35 tokens)
            generation_tokens=32,
        ),
        Task(
            name="LaMP_5", title="personalized scholarly title generation", kind="generation",
            template="Generate a title for the following abstract of a paper: {content}",
            marker="paper:", text_fields=("abstract",), label_field="title",
            rag_item='"{title}" is the title for "{abstract}" ',
            generation_tokens=32,
        ),
        Task(
            name="LaMP_7", title="personalized tweet paraphrasing", kind="generation",
            template="Paraphrase the following tweet without any explanation before or after it: {content}",
            marker="before or after it:", text_fields=("text",), label_field=None,
            rag_item='"{text}" ', rag_join="{examples} are written by a person. Following the given patterns {input}",
        ),
    )
}

# Profile fields each task's items must carry (besides "id").
PROFILE_FIELDS: dict[str, tuple[str, ...]] = {
    "LaMP_1": ("title", "abstract"),
    "LaMP_2N": ("text", "category"),
    "LaMP_2M": ("description", "tag"),
    "LaMP_3": ("text", "score"),
    "LaMP_4": ("text", "title"),
    "LaMP_5": ("abstract", "title"),
    "LaMP_7": ("text",),
}


def get_task(name: str) -> Task:
    """The task called `name` (e.g. "LaMP_7"); a clear error names the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
