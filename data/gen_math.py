#!/usr/bin/python3
"""gen_math.py — grade-school math word problems with worked answers.

TemplateGSM-style: each template draws its own numbers, names and objects,
computes the answer, and writes the reasoning as short steps ending in a
GSM8K-style final line "#### N". Everything follows from the seed (Python's
random.Random, whose integer-seeded sequence is stable across CPython
versions), so the same seed writes the same file on every machine.

    gen_math.py --out math.jsonl [--seed 1] [--bytes 1000000]

Each JSONL record: {"text": "Question: ...\\nAnswer: ...\\n#### N",
"question": ..., "answer": ...}. Also importable: generate(seed, n_bytes).
"""
import argparse
import json
import random

NAMES = [
    "Aisha", "Ben", "Carlos", "Dana", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kate", "Liam",
    "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wei", "Ximena",
    "Yusuf", "Zoe", "Amir", "Bella", "Chen", "Diego", "Emma", "Felix", "Gina", "Hassan", "Ivy", "Jonas",
    "Kofi", "Lena", "Mateo", "Nadia", "Oscar", "Pablo", "Rina", "Sofia", "Tomas", "Uma", "Victor", "Wanda",
]
FOODS = [("apples", "apple"), ("oranges", "orange"), ("cookies", "cookie"), ("cupcakes", "cupcake"),
         ("muffins", "muffin"), ("bananas", "banana"), ("pears", "pear"), ("lemons", "lemon"),
         ("donuts", "donut"), ("bagels", "bagel"), ("peaches", "peach"), ("plums", "plum")]
THINGS = [("pencils", "pencil"), ("stickers", "sticker"), ("marbles", "marble"), ("books", "book"),
          ("cards", "card"), ("stamps", "stamp"), ("shells", "shell"), ("toy cars", "toy car"),
          ("crayons", "crayon"), ("beads", "bead"), ("coins", "coin"), ("buttons", "button")]
CONTAINERS = ["boxes", "bags", "baskets", "crates", "jars", "packs"]
SHOPS = ["the bakery", "the market", "a bookstore", "the school fair", "a toy shop", "the farm stand"]
ANIMALS = [("chickens", 2), ("cows", 4), ("ducks", 2), ("goats", 4), ("sheep", 4), ("horses", 4)]


def _pick2(r, seq):
    a, b = r.sample(seq, 2)
    return a, b


def t_buy_and_eat(r):
    n, (pl, _) = r.choice(NAMES), r.choice(FOODS)
    a, b = r.randint(5, 40), r.randint(3, 30)
    c = r.randint(1, min(15, a + b))
    q = f"{n} has {a} {pl}. {n} buys {b} more and then eats {c}. How many {pl} does {n} have now?"
    s = [f"After buying, {n} has {a} + {b} = {a + b} {pl}.",
         f"After eating {c}, {n} has {a + b} - {c} = {a + b - c} {pl}."]
    return q, s, a + b - c


def t_groups(r):
    n, (pl, _), box = r.choice(NAMES), r.choice(THINGS), r.choice(CONTAINERS)
    g, k = r.randint(3, 12), r.randint(4, 25)
    q = f"{n} has {g} {box} with {k} {pl} in each. How many {pl} does {n} have in all?"
    return q, [f"{g} {box} with {k} {pl} each make {g} x {k} = {g * k} {pl}."], g * k


def t_share(r):
    n, (pl, _) = r.choice(NAMES), r.choice(FOODS)
    f, each = r.randint(2, 9), r.randint(2, 15)
    tot = f * each
    q = f"{n} shares {tot} {pl} equally among {f} friends. How many {pl} does each friend get?"
    return q, [f"Each friend gets {tot} / {f} = {each} {pl}."], each


def t_leftover(r):
    n, (pl, _) = r.choice(NAMES), r.choice(THINGS)
    per, bags = r.randint(3, 12), r.randint(3, 15)
    extra = r.randint(1, per - 1)
    tot = per * bags + extra
    q = (f"{n} puts {tot} {pl} into bags of {per}. How many {pl} are left over after filling as many "
         f"bags as possible?")
    s = [f"{tot} / {per} = {bags} full bags, which hold {bags} x {per} = {per * bags} {pl}.",
         f"The leftover is {tot} - {per * bags} = {extra}."]
    return q, s, extra


def t_buses(r):
    kids, seats = r.randint(40, 400), r.choice([20, 24, 30, 36, 40, 45, 50])
    buses = -(-kids // seats)
    q = (f"A school trip has {kids} students. Each bus holds {seats} students. How many buses are needed "
         f"so that every student has a seat?")
    s = [f"{kids} / {seats} = {kids / seats:.2f}, so {kids // seats} buses are not enough"
         if kids % seats else f"{kids} / {seats} = {kids // seats} exactly.",
         f"The school needs {buses} buses."]
    return q, s, buses


def t_shopping(r):
    n, shop = r.choice(NAMES), r.choice(SHOPS)
    (p1, s1), (p2, s2) = _pick2(r, FOODS)
    a, pa, b, pb = r.randint(2, 9), r.randint(1, 6), r.randint(2, 9), r.randint(2, 8)
    paid = ((a * pa + b * pb) // 10 + 1 + r.randint(0, 3)) * 10
    tot = a * pa + b * pb
    q = (f"At {shop}, {n} buys {a} {p1} at ${pa} each and {b} {p2} at ${pb} each. {n} pays with ${paid}. "
         f"How much change does {n} get?")
    s = [f"The {p1} cost {a} x ${pa} = ${a * pa}.", f"The {p2} cost {b} x ${pb} = ${b * pb}.",
         f"Together they cost ${a * pa} + ${b * pb} = ${tot}.", f"The change is ${paid} - ${tot} = ${paid - tot}."]
    return q, s, paid - tot


def t_speed(r):
    n = r.choice(NAMES)
    v, h = r.choice([30, 40, 45, 50, 55, 60, 65, 70, 80]), r.randint(2, 9)
    q = f"{n} drives at {v} miles per hour for {h} hours. How many miles does {n} drive?"
    return q, [f"Distance is speed times time: {v} x {h} = {v * h} miles."], v * h


def t_time_for_distance(r):
    n = r.choice(NAMES)
    v, h = r.choice([3, 4, 5, 6, 8, 10, 12, 15]), r.randint(2, 8)
    d = v * h
    q = f"{n} cycles {d} kilometers at a steady {v} kilometers per hour. How many hours does the ride take?"
    return q, [f"Time is distance divided by speed: {d} / {v} = {h} hours."], h


def t_discount(r):
    item = r.choice(["jacket", "bicycle", "lamp", "backpack", "game", "pair of shoes", "watch", "chair"])
    price = r.choice([20, 40, 50, 60, 80, 120, 150, 200, 250, 300])
    pct = r.choice([10, 20, 25, 30, 40, 50])
    off = price * pct // 100
    q = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
    s = [f"The discount is {pct}% of ${price} = {pct}/100 x {price} = ${off}.",
         f"The sale price is ${price} - ${off} = ${price - off}."]
    return q, s, price - off


def t_percent_of(r):
    tot = r.choice([20, 40, 50, 80, 100, 120, 200, 250, 400, 500])
    pct = r.choice([5, 10, 20, 25, 30, 40, 50, 60, 75])
    if tot * pct % 100:
        pct = 50
    grp = r.choice(["students in a school play", "trees in an orchard", "books in a library cart",
                    "runners in a race", "seeds in a packet"])
    kind = {"students in a school play": "are singers", "trees in an orchard": "are apple trees",
            "books in a library cart": "are novels", "runners in a race": "finish in under an hour",
            "seeds in a packet": "sprout"}[grp]
    q = f"There are {tot} {grp}, and {pct}% of them {kind}. How many is that?"
    return q, [f"{pct}% of {tot} is {pct}/100 x {tot} = {tot * pct // 100}."], tot * pct // 100


def t_age(r):
    a, b = _pick2(r, NAMES)
    x, d, y = r.randint(4, 20), r.randint(2, 30), r.randint(2, 15)
    q = f"{a} is {x} years old. {b} is {d} years older than {a}. How old will {b} be in {y} years?"
    s = [f"{b} is {x} + {d} = {x + d} years old now.", f"In {y} years {b} will be {x + d} + {y} = {x + d + y}."]
    return q, s, x + d + y


def t_twice(r):
    a, b = _pick2(r, NAMES)
    pl, _ = r.choice(THINGS)
    x, m = r.randint(3, 30), r.choice([2, 3, 4, 5])
    word = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}[m]
    q = f"{a} has {x} {pl}. {b} has {word} as many. How many {pl} do they have together?"
    s = [f"{b} has {m} x {x} = {m * x} {pl}.", f"Together they have {x} + {m * x} = {x + m * x} {pl}."]
    return q, s, x + m * x


def t_rectangle_area(r):
    w, h = r.randint(3, 40), r.randint(3, 40)
    room = r.choice(["garden", "room", "patio", "field", "classroom floor"])
    q = f"A rectangular {room} is {w} meters long and {h} meters wide. What is its area in square meters?"
    return q, [f"Area is length times width: {w} x {h} = {w * h} square meters."], w * h


def t_perimeter_fence(r):
    w, h, c = r.randint(5, 60), r.randint(5, 60), r.randint(2, 15)
    p = 2 * (w + h)
    q = (f"A farmer fences a rectangular pen {w} feet by {h} feet. Fencing costs ${c} per foot. "
         f"How much does the fence cost?")
    s = [f"The perimeter is 2 x ({w} + {h}) = {p} feet.", f"The cost is {p} x ${c} = ${p * c}."]
    return q, s, p * c


def t_average(r):
    n = r.choice(NAMES)
    k = r.randint(3, 6)
    mean = r.randint(60, 95)
    scores = [mean + r.randint(-10, 10) for _ in range(k - 1)]
    last = mean * k - sum(scores)
    if not 0 <= last <= 100:
        scores = [mean] * (k - 1)
        last = mean
    scores.append(last)
    lst = ", ".join(str(x) for x in scores[:-1]) + f" and {scores[-1]}"
    q = f"{n} scored {lst} on {k} tests. What is {n}'s average score?"
    s = [f"The total is {' + '.join(str(x) for x in scores)} = {sum(scores)}.",
         f"The average is {sum(scores)} / {k} = {mean}."]
    return q, s, mean


def t_savings(r):
    n = r.choice(NAMES)
    goal = r.choice([60, 90, 120, 150, 180, 240, 300, 360])
    have = r.randint(0, goal // 3)
    per = r.choice([5, 10, 12, 15, 20, 25, 30])
    need = goal - have
    weeks = -(-need // per)
    item = r.choice(["a bike", "a guitar", "a tablet", "a telescope", "new skates", "a camera"])
    q = (f"{n} wants {item} that costs ${goal}. {n} has saved ${have} and saves ${per} each week. "
         f"How many more weeks until {n} can buy it?")
    s = [f"{n} still needs ${goal} - ${have} = ${need}.",
         f"{need} / {per} = {need / per:g}, so {n} needs {weeks} more weeks."
         if need % per else f"{need} / {per} = {weeks} weeks."]
    return q, s, weeks


def t_wage_overtime(r):
    n = r.choice(NAMES)
    rate, hours = r.choice([10, 12, 14, 15, 16, 18, 20, 22, 25]), r.randint(41, 55)
    ot = hours - 40
    q = (f"{n} earns ${rate} an hour and 1.5 times that for every hour over 40 in a week. "
         f"{n} works {hours} hours this week. How much does {n} earn?")
    base, otpay = 40 * rate, ot * rate * 3 // 2
    if ot * rate * 3 % 2:
        hours, ot = 42, 2
        q = (f"{n} earns ${rate} an hour and 1.5 times that for every hour over 40 in a week. "
             f"{n} works {hours} hours this week. How much does {n} earn?")
        otpay = ot * rate * 3 // 2
    s = [f"Regular pay: 40 x ${rate} = ${base}.", f"Overtime rate: 1.5 x ${rate} = ${rate * 1.5:g}.",
         f"Overtime pay: {ot} x ${rate * 1.5:g} = ${otpay}.", f"Total: ${base} + ${otpay} = ${base + otpay}."]
    return q, s, base + otpay


def t_recipe(r):
    ing = r.choice(["cups of flour", "eggs", "spoons of sugar", "cups of milk", "grams of butter"])
    base_n, serve = r.randint(2, 8), r.choice([2, 4, 6])
    mult = r.randint(2, 5)
    q = (f"A recipe for {serve} people uses {base_n} {ing}. How many {ing} are needed to cook for "
         f"{serve * mult} people?")
    s = [f"{serve * mult} people is {serve * mult} / {serve} = {mult} times the recipe.",
         f"So it needs {mult} x {base_n} = {mult * base_n} {ing}."]
    return q, s, mult * base_n


def t_pages(r):
    n = r.choice(NAMES)
    pages, per = r.randint(120, 600), r.choice([10, 12, 15, 20, 25, 30, 40])
    days = -(-pages // per)
    q = f"{n} reads {per} pages a day. How many days does it take {n} to finish a {pages}-page book?"
    s = [f"{pages} / {per} = {pages / per:g}" + (f", so {n} needs {days} days (the last day is shorter)."
                                                  if pages % per else f", so {days} days.")]
    return q, s, days


def t_legs(r):
    (a1, l1), (a2, l2) = _pick2(r, ANIMALS)
    x, y = r.randint(2, 20), r.randint(2, 20)
    q = f"A farm has {x} {a1} and {y} {a2}. How many legs do the animals have in total?"
    s = [f"The {a1} have {x} x {l1} = {x * l1} legs.", f"The {a2} have {y} x {l2} = {y * l2} legs.",
         f"In total: {x * l1} + {y * l2} = {x * l1 + y * l2} legs."]
    return q, s, x * l1 + y * l2


def t_profit(r):
    n = r.choice(NAMES)
    pl, one = r.choice(FOODS)
    k, cost, price = r.randint(20, 120), r.randint(1, 4), r.randint(5, 9)
    fixed = r.choice([10, 15, 20, 25, 30])
    fixed = min(fixed, k * (price - cost) - 1)
    q = (f"{n} sells {pl} at a stand. Each {one} costs ${cost} to make and sells for ${price}. "
         f"The stand costs ${fixed} to rent. If {n} sells {k} {pl}, what is the profit?")
    s = [f"Revenue: {k} x ${price} = ${k * price}.", f"Cost of {pl}: {k} x ${cost} = ${k * cost}.",
         f"Profit: ${k * price} - ${k * cost} - ${fixed} = ${k * price - k * cost - fixed}."]
    return q, s, k * price - k * cost - fixed


def t_minutes(r):
    n = r.choice(NAMES)
    tasks = r.sample(["homework", "piano practice", "reading", "chores", "a walk", "cooking", "drawing"], 3)
    m = [r.randint(10, 70) for _ in tasks]
    tot = sum(m)
    q = (f"{n} spends {m[0]} minutes on {tasks[0]}, {m[1]} minutes on {tasks[1]} and {m[2]} minutes on "
         f"{tasks[2]}. How many minutes is that altogether?")
    return q, [f"{m[0]} + {m[1]} + {m[2]} = {tot} minutes."], tot


def t_clock(r):
    n = r.choice(NAMES)
    h, mnt = r.randint(7, 10), r.choice([0, 10, 15, 20, 30, 40, 45])
    d = r.randint(35, 200)
    end = h * 60 + mnt + d
    q = (f"{n} starts a train trip at {h}:{mnt:02d} a.m. The trip lasts {d} minutes. "
         f"At what minute past the hour does the trip end?")
    s = [f"{d} minutes is {d // 60} hours and {d % 60} minutes.",
         f"Starting at {h}:{mnt:02d}, the trip ends at {end // 60}:{end % 60:02d}.",
         f"That is {end % 60} minutes past the hour."]
    return q, s, end % 60


def t_fraction(r):
    n = r.choice(NAMES)
    pl, _ = r.choice(THINGS)
    den = r.choice([2, 3, 4, 5, 6, 8])
    num = r.randint(1, den - 1)
    tot = den * r.randint(2, 12)
    give = tot * num // den
    q = f"{n} has {tot} {pl} and gives away {num}/{den} of them. How many {pl} does {n} keep?"
    s = [f"{num}/{den} of {tot} is {tot} / {den} x {num} = {give}.", f"{n} keeps {tot} - {give} = {tot - give}."]
    return q, s, tot - give


def t_ratio(r):
    a, b = r.randint(1, 5), r.randint(1, 5)
    if a == b:
        b += 1
    unit = r.randint(2, 15)
    tot = (a + b) * unit
    x, y = r.choice([("boys", "girls"), ("red marbles", "blue marbles"), ("cats", "dogs"),
                     ("tea drinkers", "coffee drinkers")])
    q = f"The ratio of {x} to {y} is {a}:{b}. There are {tot} in all. How many {y} are there?"
    s = [f"The ratio has {a} + {b} = {a + b} parts.", f"Each part is {tot} / {a + b} = {unit}.",
         f"The {y} are {b} x {unit} = {b * unit}."]
    return q, s, b * unit


def t_temperature(r):
    city = r.choice(["Oslo", "Denver", "Quito", "Perth", "Lagos", "Seoul", "Lima", "Cairo"])
    t0, up, down = r.randint(-10, 20), r.randint(2, 15), r.randint(1, 12)
    q = (f"In {city} the temperature was {t0} degrees at dawn. It rose {up} degrees by noon and fell {down} "
         f"degrees by evening. What was the evening temperature?")
    s = [f"At noon: {t0} + {up} = {t0 + up} degrees.", f"In the evening: {t0 + up} - {down} = {t0 + up - down}."]
    return q, s, t0 + up - down


def t_interest(r):
    p = r.choice([100, 200, 400, 500, 800, 1000, 1200, 2000])
    rate, years = r.choice([2, 3, 4, 5, 6, 10]), r.randint(1, 5)
    i = p * rate * years // 100
    q = (f"A savings account pays {rate}% simple interest per year. How much interest does ${p} earn in "
         f"{years} years?")
    s = [f"One year of interest is {rate}% of ${p} = ${p * rate // 100}.",
         f"Over {years} years: {years} x ${p * rate // 100} = ${i}."]
    return q, s, i


def t_garden_rows(r):
    n = r.choice(NAMES)
    rows, per, dead = r.randint(3, 15), r.randint(4, 20), r.randint(1, 10)
    plant = r.choice(["tomato plants", "tulips", "carrots", "sunflowers", "lettuce heads"])
    q = f"{n} plants {rows} rows of {plant} with {per} in each row. {dead} of them do not grow. How many grow?"
    s = [f"{n} plants {rows} x {per} = {rows * per} {plant}.", f"{rows * per} - {dead} = {rows * per - dead} grow."]
    return q, s, rows * per - dead


def t_unit_price(r):
    pl, one = r.choice(FOODS)
    k, each = r.randint(3, 12), r.randint(2, 9)
    m = r.randint(2, 20)
    q = f"{k} {pl} cost ${k * each}. At the same price, how much do {m} {pl} cost?"
    s = [f"One {one} costs ${k * each} / {k} = ${each}.", f"{m} {pl} cost {m} x ${each} = ${m * each}."]
    return q, s, m * each


def t_work_together(r):
    a, b = _pick2(r, NAMES)
    ra, rb, h = r.randint(2, 12), r.randint(2, 12), r.randint(2, 8)
    thing = r.choice(["boxes", "pages", "posters", "cakes", "chairs"])
    q = (f"{a} can pack {ra} {thing} an hour and {b} can pack {rb} {thing} an hour. Working together for "
         f"{h} hours, how many {thing} do they pack?")
    s = [f"Together they pack {ra} + {rb} = {ra + rb} {thing} an hour.",
         f"In {h} hours: {ra + rb} x {h} = {(ra + rb) * h} {thing}."]
    return q, s, (ra + rb) * h


def t_tickets(r):
    a, c = r.randint(1, 6), r.randint(1, 8)
    pa, pc = r.choice([8, 10, 12, 15, 20]), r.choice([4, 5, 6, 7, 9])
    if pc >= pa:
        pc = pa // 2
    place = r.choice(["museum", "zoo", "cinema", "aquarium", "theater"])
    q = (f"Adult tickets to the {place} cost ${pa} and child tickets cost ${pc}. A family buys {a} adult "
         f"and {c} child tickets. What is the total cost?")
    s = [f"Adults: {a} x ${pa} = ${a * pa}.", f"Children: {c} x ${pc} = ${c * pc}.",
         f"Total: ${a * pa} + ${c * pc} = ${a * pa + c * pc}."]
    return q, s, a * pa + c * pc


def t_consecutive(r):
    k = r.choice([3, 5])
    mid = r.randint(5, 60)
    nums = [mid + i for i in range(-(k // 2), k // 2 + 1)]
    q = f"The sum of {k} consecutive whole numbers is {sum(nums)}. What is the largest of them?"
    s = [f"The middle number is the average: {sum(nums)} / {k} = {mid}.",
         f"The numbers are {', '.join(map(str, nums))}, so the largest is {nums[-1]}."]
    return q, s, nums[-1]


def t_stairs(r):
    n = r.choice(NAMES)
    floors, steps, trips = r.randint(2, 12), r.randint(10, 20), r.randint(1, 4)
    q = (f"{n} lives on floor {floors + 1}. Each floor is {steps} steps up from the one below, and the "
         f"ground floor is floor 1. {n} walks up and down {trips} times a day. How many steps is that a day?")
    one = floors * steps
    s = [f"From floor 1 to floor {floors + 1} is {floors} x {steps} = {one} steps.",
         f"Up and down is {one} x 2 = {2 * one} steps.", f"{trips} times a day: {2 * one} x {trips} = {2 * one * trips}."]
    return q, s, 2 * one * trips


def t_money_split(r):
    a, b, c = r.sample(NAMES, 3)
    bill = r.choice([45, 60, 72, 84, 90, 96, 108, 120, 150])
    tip = r.choice([10, 20])
    tot = bill + bill * tip // 100
    if tot % 3:
        bill = 90
        tot = bill + bill * tip // 100
    q = (f"{a}, {b} and {c} have dinner. The bill is ${bill} and they leave a {tip}% tip. "
         f"They split the total equally. How much does each pay?")
    s = [f"The tip is {tip}% of ${bill} = ${bill * tip // 100}.", f"The total is ${bill} + ${bill * tip // 100} = ${tot}.",
         f"Each pays ${tot} / 3 = ${tot // 3}."]
    return q, s, tot // 3


def t_rain(r):
    days = r.sample(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"], 3)
    mm = [r.randint(2, 30) for _ in days]
    avg_mult = sum(mm)
    q = (f"It rained {mm[0]} mm on {days[0]}, {mm[1]} mm on {days[1]} and {mm[2]} mm on {days[2]}. "
         f"How much more rain fell on the wettest of these days than on the driest?")
    hi, lo = max(mm), min(mm)
    s = [f"The wettest day had {hi} mm and the driest {lo} mm.", f"The difference is {hi} - {lo} = {hi - lo} mm."]
    del avg_mult
    return q, s, hi - lo


def t_pizza(r):
    n = r.randint(3, 12)
    slices = r.choice([6, 8, 10, 12])
    each = r.randint(2, 4)
    need = n * each
    pizzas = -(-need // slices)
    q = (f"Each pizza is cut into {slices} slices. {n} friends each want {each} slices. "
         f"How many pizzas should they order?")
    s = [f"They want {n} x {each} = {need} slices.",
         f"{need} / {slices} = {need / slices:g}" + (f", so they need {pizzas} pizzas." if need % slices
                                                    else f", so {pizzas} pizzas.")]
    return q, s, pizzas


def t_water_tank(r):
    cap, rate = r.choice([200, 300, 400, 500, 600, 900, 1200]), r.choice([10, 20, 25, 30, 50])
    have = r.choice([0, 50, 100])
    if have >= cap:
        have = 0
    mins = -(-(cap - have) // rate)
    q = (f"A tank holds {cap} liters and already has {have} liters in it. A hose adds {rate} liters a "
         f"minute. How many minutes until the tank is full?")
    s = [f"It needs {cap} - {have} = {cap - have} more liters.",
         f"{cap - have} / {rate} = {(cap - have) / rate:g}" + (f", so {mins} minutes." if (cap - have) % rate == 0
                                                              else f", so it is full during minute {mins}.")]
    return q, s, mins


def t_library(r):
    start, out, back, new = r.randint(200, 900), r.randint(10, 90), r.randint(5, 60), r.randint(5, 40)
    q = (f"A library has {start} books. On Monday {out} are borrowed, on Tuesday {back} are returned and "
         f"{new} new books arrive. How many books are in the library now?")
    s = [f"After Monday: {start} - {out} = {start - out}.", f"After returns: {start - out} + {back} = {start - out + back}.",
         f"With new books: {start - out + back} + {new} = {start - out + back + new}."]
    return q, s, start - out + back + new


def t_weekly(r):
    n = r.choice(NAMES)
    d, per, weeks = r.randint(3, 7), r.randint(2, 12), r.randint(2, 8)
    act = r.choice(["swims laps", "runs kilometers", "practices scales", "writes pages", "walks miles"])
    verb, unit = act.split(" ", 1)
    q = f"{n} {verb} {per} {unit} a day, {d} days a week. How many {unit} is that in {weeks} weeks?"
    s = [f"In one week: {per} x {d} = {per * d} {unit}.", f"In {weeks} weeks: {per * d} x {weeks} = {per * d * weeks}."]
    return q, s, per * d * weeks


def t_coins(r):
    n = r.choice(NAMES)
    q_, d, k = r.randint(1, 12), r.randint(1, 15), r.randint(1, 20)
    cents = 25 * q_ + 10 * d + 5 * k
    q = f"{n} has {q_} quarters, {d} dimes and {k} nickels. How many cents is that?"
    s = [f"Quarters: {q_} x 25 = {25 * q_} cents.", f"Dimes: {d} x 10 = {10 * d} cents.",
         f"Nickels: {k} x 5 = {5 * k} cents.", f"Total: {25 * q_} + {10 * d} + {5 * k} = {cents} cents."]
    return q, s, cents


def t_sequence(r):
    a, d = r.randint(1, 20), r.randint(2, 9)
    k = r.randint(6, 15)
    q = (f"A pattern starts at {a} and adds {d} each time: {a}, {a + d}, {a + 2 * d}, ... "
         f"What is the {k}th number in the pattern?")
    s = [f"The {k}th number is the first plus {k - 1} steps of {d}.", f"{a} + {k - 1} x {d} = {a + (k - 1) * d}."]
    return q, s, a + (k - 1) * d


def t_more_than(r):
    a, b = _pick2(r, NAMES)
    pl, _ = r.choice(FOODS)
    x, more = r.randint(5, 40), r.randint(2, 25)
    q = f"{a} picked {x} {pl}. {b} picked {more} more than {a}. How many {pl} did they pick altogether?"
    s = [f"{b} picked {x} + {more} = {x + more} {pl}.", f"Together: {x} + {x + more} = {2 * x + more} {pl}."]
    return q, s, 2 * x + more


def t_half_then(r):
    n = r.choice(NAMES)
    pl, _ = r.choice(THINGS)
    x = 2 * r.randint(5, 40)
    g = r.randint(1, x // 2 - 1)
    q = (f"{n} had {x} {pl}. {n} lost half of them, then gave {g} to a friend. How many {pl} does {n} "
         f"have left?")
    s = [f"After losing half: {x} / 2 = {x // 2}.", f"After giving {g} away: {x // 2} - {g} = {x // 2 - g}."]
    return q, s, x // 2 - g


TEMPLATES = [v for k, v in sorted(globals().items()) if k.startswith("t_")]


def problem(r):
    """One problem: (question, solution steps, integer answer), from a random template."""
    return r.choice(TEMPLATES)(r)


def record(q, steps, ans):
    answer = "\n".join(steps) + f"\n#### {ans}"
    return {"text": f"Question: {q}\nAnswer: {answer}", "question": q, "answer": answer}


def generate(seed, n_bytes):
    """Records until their text reaches n_bytes."""
    r = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        rec = record(*problem(r))
        out.append(rec)
        size += len(rec["text"].encode("utf-8")) + 1  # the text prepare reads, not the JSON around it
    return out


def cli(doc, make, extra=()):
    """The command line both generators share: --out, --seed, --bytes and any
    extra (flag, argparse keywords); make(args) gives the records."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bytes", type=int, default=1_000_000)
    for flag, kw in extra:
        ap.add_argument(flag, **kw)
    a = ap.parse_args()
    with open(a.out, "w", encoding="utf-8") as f:
        for rec in make(a):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main():
    cli(__doc__, lambda a: generate(a.seed, a.bytes))


if __name__ == "__main__":
    main()
