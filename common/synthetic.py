"""A deterministic synthetic data set in LaMP's format, made by code, for offline demos and tests.

It carries a real per-user signal, so personalization matters:
- LaMP_2M (movie tagging): movie descriptions come from topic vocabularies (space, detectives,
  love, ...). Every topic has 3 plausible tags, and each user privately maps each topic to one
  of them (a robots movie is "sci-fi" to one user, "dystopia" to another). A user's profile and
  query follow that map, so same-topic items retrieved by BM25 reveal the user's tag, while the
  most common tag of a topic is right for only about 40% of users.
- LaMP_7 (tweet paraphrasing): tweets come from casual/formal template pairs. Each user has a
  writing style (letter case, abbreviations, elongated words, "tbh"/"lol" habits, a closing
  punctuation and a signature emoticon or hashtag). Profile tweets and the gold are the casual
  tweet in the user's style; the query input is the formal (neutral) version of the gold.

The same arguments give the same data and byte-identical files.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .files import write_atomic
from .records import LampSplit, User
from .tasks import get_task

SUPPORTED_TASKS = ("LaMP_2M", "LaMP_7")
_LAMP_NAME = {"LaMP_2M": "LaMP_2", "LaMP_7": "LaMP_7"}  # what LaMP writes in an outputs file

# ---------------------------------------------------------------- LaMP_2M vocabulary
# topic: (plausible tags, who, what, where, stake, detail); phrases are "|"-separated.
_MOVIE_TOPICS: dict[str, tuple[tuple[str, ...], str, str, str, str, str]] = {
    "space": (("sci-fi", "dystopia", "thought-provoking"),
              "a lonely engineer|an android pilot|a rogue robot|the crew of a starship|a colony scientist",
              "discovers a signal from a dead planet|builds a robot that learns to dream|wakes from cryosleep "
              "decades too late|loses contact with mission control|finds an alien machine",
              "aboard a failing space station|on a frozen moon|in orbit around Mars|deep in the asteroid belt|"
              "on a colony ship between galaxies",
              "repair the reactor|stop the machines from taking over|bring the colony ship home|"
              "decide whether the android is alive",
              "the oxygen is running out|the ship's computer begins to lie|an alien artifact hums in the cargo bay|"
              "the robots start to ask questions"),
    "detective": (("twist ending", "psychology", "violence"),
                  "a weary police detective|a retired inspector|a young forensic analyst|a private investigator",
                  "investigates a string of murders|finds a body in a locked room|follows a trail of anonymous "
                  "letters|reopens a cold murder case|interrogates a suspect who confesses too easily",
                  "in a rain-soaked city|in a quiet seaside village|inside a snowed-in mansion|"
                  "in the city's darkest alleys",
                  "unmask the killer|prove the suspect is innocent|solve the case before another victim dies|"
                  "find the missing witness",
                  "every clue points to a different suspect|the killer seems to know the detective's next move|"
                  "the evidence was planted|a second body is found"),
    "love": (("romance", "comedy", "classic"),
             "a shy bookshop owner|two rival wedding planners|a widowed baker|a young painter|a small-town teacher",
             "falls in love with a stranger|meets a first love again after twenty years|writes love letters to "
             "a secret admirer|gets stuck with a charming enemy",
             "in Paris in the spring|at a summer wedding|in a small seaside town|in a crowded city cafe",
             "choose between love and a career|win back a lost love|confess their feelings|save the failing cafe",
             "a misunderstanding keeps the lovers apart|a kiss in the rain changes everything|"
             "the whole town is watching the romance|an old diary reveals a forgotten love"),
    "war": (("action", "true story", "violence"),
            "a young soldier|a battle-scarred sergeant|a field medic|a squad of paratroopers|a resistance fighter",
            "is trapped behind enemy lines|leads a desperate attack|survives a brutal siege|"
            "escapes a prison camp|defends a ruined village",
            "during the Second World War|in the trenches of 1916|in the jungles of Vietnam|on the beaches of Normandy",
            "rescue a wounded comrade|hold the bridge until dawn|bring the platoon home alive|"
            "deliver an order that can stop the battle",
            "the artillery never stops|the battlefield is covered in mud and blood|"
            "the enemy tanks are closing in|the last radio is destroyed"),
    "magic": (("fantasy", "based on a book", "action"),
              "a young wizard|an orphan who can speak to dragons|an elf princess|a knight and a sorceress",
              "discovers a hidden kingdom|finds an enchanted sword|learns forbidden magic|"
              "is chosen by an ancient prophecy",
              "in a land of dragons and castles|in an enchanted forest|beyond the misty mountains|"
              "in a kingdom ruled by a dark lord",
              "defeat the dark sorcerer|break an ancient curse|destroy a cursed ring|save the magical realm",
              "a dragon guards the final gate|the spell book begins to glow|the elves refuse to help|"
              "the prophecy was only half told"),
    "satire": (("dark comedy", "comedy", "social commentary"),
               "a clumsy office manager|a dysfunctional family|two bickering brothers|an incompetent hitman|"
               "a failing stand-up comic",
               "accidentally kills the boss|plans a disastrous funeral|hides a corpse during a dinner party|"
               "wins the lottery and loses everything",
               "at a chaotic family reunion|in a dreary corporate office|in a sleepy suburban neighborhood|"
               "at a disastrous holiday dinner",
               "cover up the mistake|keep the family business afloat|survive the holidays|get rich without working",
               "every lie makes things funnier and worse|the neighbors grow suspicious|"
               "a dead body keeps turning up|the absurd plan spirals out of control"),
    "society": (("social commentary", "true story", "thought-provoking"),
                "a young lawyer|a factory worker|an immigrant mother|a journalist|a striking union leader",
                "fights a corrupt corporation|exposes racism in a small town|challenges an unjust law|"
                "organizes a strike",
                "in a segregated southern town|in a poor industrial city|in a divided neighborhood|"
                "in the halls of power",
                "win justice for the community|reveal the truth to the public|change the law|"
                "protect the workers' rights",
                "the powerful try to silence the truth|poverty and inequality shape every choice|"
                "the media ignores the story|the community is torn apart"),
    "heist": (("action", "violence", "twist ending"),
              "a master thief|a crew of bank robbers|a mob enforcer|a getaway driver|a con artist",
              "plans the perfect bank heist|double-crosses the mafia|steals a priceless diamond|"
              "runs a casino scam",
              "in Las Vegas|in the gangster underworld of Chicago|in a heavily guarded vault|in the streets of Naples",
              "pull off one last job|escape with the money|settle a score with a rival gang|outsmart the police",
              "the gun battle leaves the streets in chaos|someone in the crew is a traitor|"
              "the car chase ends in flames|the vault is not what it seems"),
    "mind": (("psychology", "thought-provoking", "twist ending"),
             "a troubled psychiatrist|a woman with amnesia|an insomniac clerk|a patient in an asylum|a grieving father",
             "begins to lose his memory|hears voices in his head|questions what is real|"
             "relives the same day over and over",
             "inside a psychiatric hospital|in a dream that never ends|in a fractured memory|"
             "in the mind of a patient",
             "face a buried trauma|uncover the truth about the past|tell dreams from reality|escape madness",
             "nothing is what it seems|the therapist hides a secret|his own memories cannot be trusted|"
             "identity and guilt blur together"),
    "history": (("true story", "classic", "based on a book"),
                "a famous scientist|a legendary athlete|a young queen|a pioneering aviator|a great composer",
                "rises from poverty to glory|changes the course of history|breaks a world record|"
                "writes a masterpiece",
                "in nineteenth-century London|at the 1936 Olympics|in Victorian England|during the Great Depression",
                "overcome prejudice and doubt|win the championship|keep the throne|prove a revolutionary idea",
                "the biography is drawn from real letters|an inspiring life unfolds over decades|"
                "the nation watches in awe|based on the acclaimed memoir"),
}
_UNTIL = "time runs out|the sun rises|it is too late|the storm arrives|winter comes"


def _pick(rng: random.Random, phrases: str) -> str:
    return rng.choice(phrases.split("|"))


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _movie_description(rng: random.Random, topic: str) -> str:
    """2-3 sentences about one movie of `topic`."""
    _, who, what, where, stake, detail = _MOVIE_TOPICS[topic]
    first = rng.choice((
        f"{_cap(_pick(rng, who))} {_pick(rng, what)} {_pick(rng, where)}.",
        f"The film follows {_pick(rng, who)} who {_pick(rng, what)} {_pick(rng, where)}.",
    ))
    more = [
        f"Soon {_pick(rng, detail)}, and they must {_pick(rng, stake)} before {_pick(rng, _UNTIL)}.",
        f"Together with {_pick(rng, who)}, they try to {_pick(rng, stake)}.",
        f"{_cap(_pick(rng, detail))}.",
    ]
    rng.shuffle(more)
    return " ".join([first] + more[: rng.randint(1, 2)])


def _make_movie_users(n_users: int, rng: random.Random, profile_size: tuple[int, int]) -> tuple[list[User], dict]:
    task = get_task("LaMP_2M")
    topics = list(_MOVIE_TOPICS)
    users: list[User] = []
    meta: dict = {"user_tags": {}, "item_topics": {}, "query_topics": {}}
    for i in range(n_users):
        uid = str(1000 + i)
        tag_of = {t: rng.choice(_MOVIE_TOPICS[t][0]) for t in topics}  # the user's private taste
        size = rng.randint(*profile_size)
        favorites = rng.sample(topics, min(rng.randint(3, 5), size // 2))
        others = [t for t in topics if t not in favorites]
        # Two items for every favorite so the query's topic is always represented; the rest
        # mostly favorites, sometimes another topic.
        item_topics = [t for t in favorites for _ in range(2)]
        while len(item_topics) < size:
            item_topics.append(rng.choice(others) if others and rng.random() < 0.15 else rng.choice(favorites))
        rng.shuffle(item_topics)
        query_topic = rng.choice(favorites)
        seen: set[str] = set()

        def fresh(topic: str) -> str:
            for _ in range(50):
                text = _movie_description(rng, topic)
                if text not in seen:
                    seen.add(text)
                    return text
            return text  # a repeat after 50 tries changes nothing that matters

        profile = [{"id": f"{uid}{j}", "description": fresh(t), "tag": tag_of[t]} for j, t in enumerate(item_topics)]
        users.append(User(id=uid, input=task.instruction(fresh(query_topic)), profile=profile,
                          gold=tag_of[query_topic]))
        meta["user_tags"][uid] = tag_of
        meta["item_topics"][uid] = {p["id"]: t for p, t in zip(profile, item_topics)}
        meta["query_topics"][uid] = query_topic
    return users, meta


# ---------------------------------------------------------------- LaMP_7 vocabulary
_SLOTS = {
    "place": "the beach|the mall|my grandma's house|the gym|the park|the city",
    "food": "pizza|tacos|pancakes|sushi|ice cream|burgers",
    "show": "the new season of lost|the football game|american idol|the hockey final|a horror movie",
    "person": "my sister|my best friend|my mom|my roommate|my brother",
    "day": "tomorrow|this weekend|tonight|on friday|next week",
}
# (casual tweet, formal paraphrase of it)
_TWEETS = (
    ("going to {place} with {person} {day}", "I am planning to visit {place} with {person} {day}."),
    ("just had the best {food} ever", "I recently ate some of the finest {food} I have ever had."),
    ("cant sleep again and i have work in the morning",
     "I am unable to sleep once more, although I work in the morning."),
    ("watching {show} right now and its so good", "I am currently watching {show}, and I am enjoying it a lot."),
    ("my phone died and i missed everything", "My phone ran out of battery, so I missed everything."),
    ("so tired of this rain, i want summer back", "I am weary of the rainy weather and wish summer would return."),
    ("{person} is coming over {day}, cant wait", "I am looking forward to {person} visiting {day}."),
    ("really need coffee before this meeting", "I need a cup of coffee before the meeting starts."),
    ("lost my keys for the third time this week", "This week I have misplaced my keys for the third time."),
    ("finally finished my exams, now i can relax", "I have completed my exams at last, so I am able to relax."),
    ("ate way too much {food} and now i feel sick", "I ate an excessive amount of {food} and now I feel unwell."),
    ("the traffic on the way to {place} was terrible", "The traffic on the way to {place} was very bad."),
    ("happy birthday to {person}, love you", "I would like to wish {person} a happy birthday, with love."),
    ("bored at home, anyone want to hang out {day}", "I am bored at home; would anyone like to meet {day}?"),
    ("my cat knocked my laptop off the table again", "Once again, my cat pushed my laptop off the table."),
    ("stayed up all night watching {show}", "I was awake the whole night watching {show}."),
    ("you are the best, thank you so much {person}", "Thank you very much, {person}; you are wonderful."),
    ("cant believe i have to work {day}", "I find it hard to believe that I have to work {day}."),
)
_ABBREVIATIONS = {"you": "u", "your": "ur", "are": "r", "really": "rly", "please": "pls", "tonight": "2nite",
                  "tomorrow": "tmrw", "and": "&", "with": "w/", "love": "luv", "thank": "thx"}
_ELONGATE = {"so", "best", "good", "tired", "bored", "finally", "love", "luv", "sick", "again", "terrible",
             "cant", "really", "rly"}
_CASES = ("sentence", "lower", "title", "upper")
_FILLERS = ("", "omg ", "tbh ", "ugh ", " lol", " haha")  # a leading space: said after the tweet
_ENDINGS = ("", "!!!", "...", ".")
_SIGNATURES = ("", ":)", ":D", "<3", "xD", "#blessed", "#lifegoals", "^_^", ";)")


@dataclass(frozen=True)
class TweetStyle:
    """One user's writing habits; `apply` turns a casual tweet into that user's tweet."""

    case: str
    abbreviate: bool
    elongate: bool
    filler: str
    ending: str
    signature: str

    def quirks(self) -> int:
        return sum((self.case != "sentence", self.abbreviate, self.elongate, bool(self.filler),
                    bool(self.ending), bool(self.signature)))

    def apply(self, casual: str) -> str:
        words = casual.split()
        if self.abbreviate:
            words = [_ABBREVIATIONS.get(w, w) for w in words]
        if self.elongate:
            # Stretch the habit words; a tweet without any gets its last word stretched.
            hits = [k for k, w in enumerate(words) if w.strip(",") in _ELONGATE] or [len(words) - 1]
            for k in hits:
                core = words[k].rstrip(",")
                words[k] = core + core[-1] * 3 + words[k][len(core):]
        text = " ".join(words)
        if self.filler.endswith(" "):
            text = self.filler + text
        elif self.filler:
            text = text + self.filler
        if self.case == "lower":
            text = text.lower()
        elif self.case == "upper":
            text = text.upper()
        elif self.case == "title":
            text = " ".join(w[:1].upper() + w[1:] for w in text.split())
        else:
            text = " ".join("I" if w == "i" else w for w in _cap(text).split())
        text += self.ending
        return f"{text} {self.signature}" if self.signature else text


def _all_styles() -> list[TweetStyle]:
    """Every style with at least three quirks, in a fixed order."""
    styles = (TweetStyle(c, a, e, f, n, s) for c, a, e, f, n, s in itertools.product(
        _CASES, (False, True), (False, True), _FILLERS, _ENDINGS, _SIGNATURES))
    return [s for s in styles if s.quirks() >= 3]


def _tweet(rng: random.Random) -> tuple[str, str]:
    """(casual, formal) versions of one new tweet."""
    casual, formal = rng.choice(_TWEETS)
    fill = {k: _pick(rng, v) for k, v in _SLOTS.items()}
    return casual.format(**fill), _cap(formal.format(**fill))


def _make_tweet_users(n_users: int, rng: random.Random, profile_size: tuple[int, int]) -> tuple[list[User], dict]:
    task = get_task("LaMP_7")
    styles = rng.sample(_all_styles(), n_users)  # distinct styles: every user is recognizable
    users: list[User] = []
    meta: dict = {"styles": {}, "query_casual": {}}
    for i, style in enumerate(styles):
        uid = str(1000 + i)
        seen: set[str] = set()
        pairs = []
        for _ in range(rng.randint(*profile_size) + 1):
            for _ in range(50):
                pair = _tweet(rng)
                if pair[0] not in seen:
                    break
            seen.add(pair[0])
            pairs.append(pair)
        *history, (query_casual, query_formal) = pairs
        profile = [{"text": style.apply(casual), "id": f"{uid}{j}"} for j, (casual, _) in enumerate(history)]
        users.append(User(id=uid, input=task.instruction(query_formal), profile=profile,
                          gold=style.apply(query_casual)))
        meta["styles"][uid] = asdict(style)
        meta["query_casual"][uid] = query_casual
    return users, meta


# ---------------------------------------------------------------- public API
def make_synthetic(task: str = "LaMP_2M", n_users: int = 40, seed: int = 0,
                   profile_size: tuple[int, int] = (12, 20)) -> LampSplit:
    """The synthetic split of `task` (LaMP_2M or LaMP_7): `n_users` users, each with one query,
    a gold and a profile of `profile_size` (inclusive range) items. Deterministic in its arguments.
    `meta` records the hidden truth (per-user tag maps or styles) for tests and analysis."""
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"synthetic data exists for {', '.join(SUPPORTED_TASKS)}, not {task!r}")
    low, high = profile_size
    if not 2 <= low <= high:
        raise ValueError(f"profile_size must be (low, high) with 2 <= low <= high, got {profile_size}")
    if n_users < 1:
        raise ValueError(f"n_users must be at least 1, got {n_users}")
    rng = random.Random(seed)
    if task == "LaMP_2M":
        users, meta = _make_movie_users(n_users, rng, profile_size)
    else:
        n_styles = len(_all_styles())
        if n_users > n_styles:
            raise ValueError(f"synthetic LaMP_7 has {n_styles} distinct styles; asked for {n_users} users")
        users, meta = _make_tweet_users(n_users, rng, profile_size)
    meta.update(synthetic=True, split="dev", seed=seed, profile_size=list(profile_size))
    return LampSplit(task=get_task(task), users=users, source=None, meta=meta)


def write_synthetic(dest: str | Path, task: str = "LaMP_2M", n_users: int = 40, seed: int = 0) -> list[Path]:
    """Write the synthetic split as LaMP's `dev_questions.json` + `dev_outputs.json`, and a README.md
    saying the data is synthetic and how it was made, into `dest`; returns the paths. Atomic per file."""
    data = make_synthetic(task, n_users=n_users, seed=seed)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    questions = [{"id": u.id, "input": u.input, "profile": u.profile} for u in data.users]
    outputs = {"task": _LAMP_NAME[task], "golds": [{"id": u.id, "output": u.gold} for u in data.users]}
    how = ("per-user topic->tag maps over 10 movie topics" if task == "LaMP_2M"
           else "per-user writing styles applied to templated tweets")
    readme = (f"SYNTHETIC data, not real LaMP data: {task} in LaMP's file format, {n_users} users, made by "
              f"`fedhydra data synth --task {task} --users {n_users} --seed {seed}` (fedhydra.common.synthetic) "
              f"from built-in templates with {how}.\n")
    files = [(dest / "dev_questions.json", json.dumps(questions, ensure_ascii=False, indent=1) + "\n"),
             (dest / "dev_outputs.json", json.dumps(outputs, ensure_ascii=False, indent=1) + "\n"),
             (dest / "README.md", readme)]
    for path, text in files:
        write_atomic(path, text)
    return [path for path, _ in files]
