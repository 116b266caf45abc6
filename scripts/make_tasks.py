"""Regenerate job/assets/tasks.jsonl, the bundled default dataset.

Small deterministic tasks a tiny model learns in a few CPU minutes, in the
databricks-dolly column layout (instruction / context / response), English and Korean:
    python scripts/make_tasks.py > job/assets/tasks.jsonl
"""

import json
import random

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Korea": "Seoul", "Italy": "Rome", "Spain": "Madrid",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Chile": "Santiago",
    "Canada": "Ottawa", "Greece": "Athens", "Poland": "Warsaw", "Cuba": "Havana", "Iran": "Tehran",
    "Ireland": "Dublin", "Austria": "Vienna", "Sweden": "Stockholm", "Vietnam": "Hanoi", "China": "Beijing",
}
KO_EN = {
    "사과": "apple", "바다": "sea", "하늘": "sky", "학교": "school", "고양이": "cat", "강아지": "dog",
    "나무": "tree", "물": "water", "책": "book", "친구": "friend", "집": "house", "꽃": "flower",
    "달": "moon", "별": "star", "비": "rain", "눈": "snow", "산": "mountain", "길": "road",
}
WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "milk", "rain", "star", "moon", "road",
         "door", "lamp", "ship", "rock", "leaf", "king", "song", "gold"]
WEATHER = ["맑습니다", "흐립니다", "비가 옵니다", "눈이 옵니다", "바람이 붑니다"]
CITIES_KO = ["서울", "부산", "대구", "인천", "광주", "대전", "울산", "제주"]
NEWS_TAIL = ["시민들은 외출을 계획하고 있습니다.", "기온은 평년과 비슷합니다.", "내일은 날씨가 바뀔 수 있습니다.",
             "공원에는 사람들이 많습니다.", "교통은 원활한 편입니다."]


def capital(rng):
    country = rng.choice(list(CAPITALS))
    return f"What is the capital of {country}?", "", f"The capital of {country} is {CAPITALS[country]}."


def translate(rng):
    word = rng.choice(list(KO_EN))
    return "다음 단어를 영어로 번역하세요.", word, f"{word}: {KO_EN[word]}"


def add(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return "Add the two numbers.", f"{a} + {b}", f"{a} + {b} = {a + b}"


def repeat(rng):
    word = rng.choice(WORDS)
    return "Repeat the word three times.", word, " ".join([word] * 3)


def summarize(rng):
    city, weather = rng.choice(CITIES_KO), rng.choice(WEATHER)
    first = f"오늘 {city}의 날씨는 {weather}."
    document = " ".join([first, *rng.sample(NEWS_TAIL, 2)])
    return "다음 글을 요약해주세요.", document, f"{city}: {weather}."


def count(rng):
    items = [rng.choice(WORDS[:5]) for _ in range(rng.randint(1, 6))]
    return "How many words are in the list?", ", ".join(items), f"There are {len(items)} words."


def main(rows=3000, seed=0):
    rng = random.Random(seed)
    tasks = [capital, translate, add, repeat, summarize, count]
    for _ in range(rows):
        instruction, context, response = rng.choice(tasks)(rng)
        print(json.dumps({"instruction": instruction, "context": context, "response": response}, ensure_ascii=False))


if __name__ == "__main__":
    main()
