"""Word lists of our own for the synthetic tasks (needle keys, common-word lists).

Plain, concrete English words that every tokenizer knows, so a task measures retrieval, not
spelling. Needle keys are "adjective-noun" pairs (120 x 200 = 24,000 distinct keys), which do not
occur in ordinary prose, so a key never collides with the haystack.
"""

from __future__ import annotations

ADJECTIVES: tuple[str, ...] = tuple(
    """
    able active amber ancient angry bitter black blue bold brave bright brisk broad brown busy calm
    careful cheap clean clever cold cool crisp curious damp dark deep dense dim dry dull dusty eager
    early easy empty even faint fair famous fancy fast fierce firm flat fond free fresh friendly full
    gentle giant glad golden grand gray great green happy hard heavy hidden high hollow honest hot huge
    humble hungry icy idle jolly keen kind large late lazy light little lively lone long loud lovely low
    loyal lucky mellow mild modern narrow neat new nice noble odd old open orange pale patient plain
    polite poor proud purple quick quiet rapid rare raw red rich rough round royal rusty sad safe
    sandy sharp shiny short shy silent silver simple slow small smooth soft solid sour spare stark
    steady steep still stormy strange strict strong sturdy sunny sweet swift tall tame tender thick thin
    tidy tiny tough vast violet warm weary wet white wide wild windy wise yellow young
    """.split()
)

NOUNS: tuple[str, ...] = tuple(
    """
    acorn anchor anthem apple apron arrow attic badge bakery ballad banjo barn barrel basket beacon
    beard bell bench berry blanket boat bottle boulder bracelet branch bread bridge broom bucket
    buffalo bugle button cabin cactus camel candle canoe canyon carpet carrot castle cellar chair chalk
    cherry chimney circus cliff clock cloud coffee compass cookie copper cottage crayon cricket crown
    curtain cushion daisy desert diamond dolphin donkey dragon drum eagle easel elbow engine falcon
    feather fence ferry fiddle flag flute forest fountain fox garden garlic giraffe glacier glove
    goose grape guitar hammer harbor harp helmet heron hill honey horse island jacket jar jungle kettle
    kite ladder lagoon lamp lantern lemon letter lily lion lobster locket magnet maple marble meadow
    melon mirror mitten monkey moon mountain muffin needle nest notebook oak ocean olive onion orchard
    otter owl paddle palace parrot peach pebble pencil pepper piano pillow pine pirate planet plum
    pocket pond potato pumpkin puzzle quilt rabbit radish raft river robin rocket saddle sailor salmon
    sandal scarf shell shovel silk sled sparrow spoon squirrel stable statue stove sugar swan table
    teapot temple thimble thunder tiger tomato tower tractor trumpet tulip turtle umbrella valley
    velvet violin wagon walnut whale whistle window wizard wolf yarn zebra
    """.split()
)

VERBS: tuple[str, ...] = tuple(
    """
    bake borrow build carry chase climb collect cook count dance dig draw dream drift drive fetch fold
    follow gather glow guard hike hunt jump juggle knit laugh lift listen march mend mix paint pour
    push read repair ride row sail scrub sew shout sing sketch skate ski sleep slide smile sort spin
    stitch swim swing sweep teach throw travel wander wash weave whisper whistle write
    """.split()
)

# One list of distinct single words for frequency tasks (common-word extraction).
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(NOUNS + ADJECTIVES + VERBS))
