"""Slides as the unit of work: whole-slide images (or folders of pre-tiled slides) in, tiles
explained like images, one heatmap per slide out.

plan (which tiles, from the tissue mask) -> source (a tile's pixels, in the decode stage) ->
the usual explain and write stages (a tile is an image named ``<slide>/<x>_<y>``, its topk.csv
rows carry slide, x, y, mpp and the tile's map pooled to cells) -> heatmap (stitched from
topk.csv at the end of a run or by merge, so resume and shards need nothing more).
"""
