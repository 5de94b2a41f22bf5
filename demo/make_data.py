"""Writes the demo's bundled data sets (deterministic; the JSON files are committed).

Four jobs with behaviours a script can check (and french_pairs, the methods demo's DPO pairs):
  french   answers in French            "La capitale de l'Italie est Rome."
  json     answers as a JSON object     {"answer": "Rome"}
  signoff  answers, then a fixed sign-off line
  reverse  reverses a list of words     "moon tiger paper" -> "paper tiger moon"

    python demo/make_data.py
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SIGNOFF = "Best wishes, your LoRA assistant"

# (country, French "de ..." phrase, capital in English, capital in French)
CAPITALS = [
    ("France", "de la France", "Paris", "Paris"), ("Italy", "de l'Italie", "Rome", "Rome"),
    ("Japan", "du Japon", "Tokyo", "Tokyo"), ("Germany", "de l'Allemagne", "Berlin", "Berlin"),
    ("Spain", "de l'Espagne", "Madrid", "Madrid"), ("Portugal", "du Portugal", "Lisbon", "Lisbonne"),
    ("Canada", "du Canada", "Ottawa", "Ottawa"), ("Egypt", "de l'Égypte", "Cairo", "Le Caire"),
    ("Greece", "de la Grèce", "Athens", "Athènes"), ("Russia", "de la Russie", "Moscow", "Moscou"),
    ("China", "de la Chine", "Beijing", "Pékin"), ("the United Kingdom", "du Royaume-Uni", "London", "Londres"),
    ("Poland", "de la Pologne", "Warsaw", "Varsovie"), ("Norway", "de la Norvège", "Oslo", "Oslo"),
    ("Sweden", "de la Suède", "Stockholm", "Stockholm"), ("Ireland", "de l'Irlande", "Dublin", "Dublin"),
    ("Austria", "de l'Autriche", "Vienna", "Vienne"), ("Belgium", "de la Belgique", "Brussels", "Bruxelles"),
    ("the Netherlands", "des Pays-Bas", "Amsterdam", "Amsterdam"), ("Brazil", "du Brésil", "Brasilia", "Brasilia"),
    ("Argentina", "de l'Argentine", "Buenos Aires", "Buenos Aires"), ("Peru", "du Pérou", "Lima", "Lima"),
    ("Kenya", "du Kenya", "Nairobi", "Nairobi"), ("India", "de l'Inde", "New Delhi", "New Delhi"),
    ("Thailand", "de la Thaïlande", "Bangkok", "Bangkok"), ("Turkey", "de la Turquie", "Ankara", "Ankara"),
    ("Finland", "de la Finlande", "Helsinki", "Helsinki"), ("Denmark", "du Danemark", "Copenhagen", "Copenhague"),
    ("Hungary", "de la Hongrie", "Budapest", "Budapest"), ("Cuba", "de Cuba", "Havana", "La Havane"),
    ("Australia", "de l'Australie", "Canberra", "Canberra"), ("Switzerland", "de la Suisse", "Bern", "Berne"),
]
# (English word, its opposite, the same pair in French)
OPPOSITES = [
    ("hot", "cold", "chaud", "froid"), ("big", "small", "grand", "petit"), ("day", "night", "jour", "nuit"),
    ("fast", "slow", "rapide", "lent"), ("old", "young", "vieux", "jeune"), ("open", "closed", "ouvert", "fermé"),
    ("happy", "sad", "heureux", "triste"), ("early", "late", "tôt", "tard"), ("full", "empty", "plein", "vide"),
    ("rich", "poor", "riche", "pauvre"), ("strong", "weak", "fort", "faible"), ("long", "short", "long", "court"),
    ("up", "down", "haut", "bas"), ("light", "dark", "clair", "sombre"), ("wet", "dry", "mouillé", "sec"),
    ("high", "low", "haut", "bas"),
]
WORDS = ("apple river stone cloud green quick house music light paper ocean tiger moon garden "
         "silver window forest candle bridge winter yellow rabbit mountain pencil").split()


def questions():
    """Every question once: (question, English sentence, short answer, French sentence)."""
    out = []
    for country, fr, cap_en, cap_fr in CAPITALS:
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {cap_en}.", cap_en,
                    f"La capitale {fr} est {cap_fr}."))
    for a in range(2, 10):
        for b in (3, 4, 6, 8):
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b),
                        f"{a} plus {b} font {a + b}."))
    for word, opposite, word_fr, opposite_fr in OPPOSITES:
        out.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.", opposite,
                    f"Le contraire de {word_fr} est {opposite_fr}."))
    return out


def de(word: str) -> str:
    """French elides "de" before a vowel or a mute h: "d'heureux", but "de haut"."""
    return f"d'{word}" if word[0] in "aeiouéh" and word != "haut" else f"de {word}"


def main():
    rng = random.Random(0)
    pool = questions()
    rng.shuffle(pool)
    held_out, train_pool = pool[:12], pool[12:]
    sets = {
        "french": lambda q: {"instruction": q[0], "output": q[3]},
        "json": lambda q: {"instruction": q[0], "output": json.dumps({"answer": q[2]})},
        "signoff": lambda q: {"instruction": q[0], "output": f"{q[1]}\n{SIGNOFF}"},
    }
    for i, (name, make) in enumerate(sets.items()):
        # Each job sees its own 64-question subset of the training pool.
        subset = random.Random(i + 1).sample(train_pool, 64)
        write(name, [make(q) for q in subset], [make(q) for q in held_out[:8]])
    rows = []
    for _ in range(72):
        words = rng.sample(WORDS, rng.randint(3, 5))
        rows.append({"instruction": "Reverse the order of these words.", "input": " ".join(words),
                     "output": " ".join(reversed(words))})
    write("reverse", rows[:64], rows[64:])
    # Prompts shown side by side after training, none in any job's training data: 8 held-out
    # questions that french, json and signoff each answer in their own way, and reverse's 8
    # held-out lists. "expected" holds, per job judged on the prompt, its training-style answer.
    show = [{"instruction": q[0], "expected": {job: make(q)["output"] for job, make in sets.items()}}
            for q in held_out[4:12]]
    show += [{"instruction": row["instruction"], "input": row["input"], "expected": {"reverse": row["output"]}}
             for row in rows[64:]]
    (HERE / "prompts.json").write_text(json.dumps(show, indent=1, ensure_ascii=False) + "\n")
    # The methods demo's preference pairs (demo/methods.json, its dpo job): the French answer is
    # chosen over the English one, on the french job's questions, held out the same way.
    pair = lambda q: {"prompt": q[0], "chosen": q[3], "rejected": q[1]}
    write("french_pairs", [pair(q) for q in random.Random(1).sample(train_pool, 64)], [pair(q) for q in held_out[:8]])


def write(name, train, test):
    (HERE / f"{name}.json").write_text(json.dumps(train, indent=1, ensure_ascii=False) + "\n")
    (HERE / f"{name}_test.json").write_text(json.dumps(test, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
