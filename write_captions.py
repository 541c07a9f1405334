"""Write an image-caption folder from a class-labelled dataset: the data of a text-to-image teacher, in the convention
of diffusers' training scripts and datasets' imagefolder (images, plus metadata.jsonl with file_name and text).

    python write_captions.py --dataset fashion-mnist --out runs/fashion-mnist-text/captions
    python write_captions.py --data-dir my_images --image-size 32 --out runs/custom-text/captions   # class subfolders

Image i of the training split is <out>/<class>/<i>.png, captioned with template i % (number of templates) of
--templates, filled with its class name ("a photo of a sandal"). Class k's prompt in template k % (number of
templates) is held out: eval_prompts.txt holds those (one a class: the yardstick's prompts, evaluate.py --prompts),
prompts.txt the others (the prompts to distill for: distill.py --prompts). So every class and every phrasing is
distilled, but never the held-out pairing of the two, as a prompt set held out of the same distribution (SD's
students are scored on COCO captions they were not distilled for). The teacher is trained on all of them: a text
encoder made here (models.make_text_encoder) is random and frozen, so a prompt its teacher never saw is noise to it,
where SD's CLIP generalises. The real images of distillation's GAN term keep their captions.
"""
import json
import os
import shutil

from PIL import Image

from cli import UserError, number, parse, progress, run, script_parser
from data import class_names_of_data, load_dataset, to_uint8
from recipes import PRESETS


def main():
    p = script_parser(__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="dataset folder, as for train_teacher.py")
    p.add_argument("--out", required=True, help="the folder to write (refused where it exists, unless --overwrite)")
    p.add_argument("--templates", nargs="+",
                   default=["a photo of a {}", "a picture of a {}", "an image of a {}", "a {}", "a good photo of a {}"],
                   help="captions, {} = the class name; image i gets template i %% their number, and class k's prompt "
                        "in template k %% their number is held out from distillation")
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    p.add_argument("--image-size", type=number(int, 0), default=None, help="your own images (--data-dir, no --dataset): their square size")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None, help="your own images: grey (1) or RGB (3); default 3")
    args = parse(p)
    spec = PRESETS[args.dataset]
    if not spec["shape"] and not args.image_size:
        raise UserError("your own images need --image-size (and --data-dir with class subfolders)")
    shape = spec["shape"] or (args.channels or 3, args.image_size, args.image_size)
    for template in args.templates:
        if template.count("{}") != 1:
            raise UserError(f"template {template!r} needs one {{}} for the class name, e.g. 'a photo of a {{}}'")
    if len(set(args.templates)) < 2:
        raise UserError("--templates needs two or more different captions: each class has one held out from distillation")
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"{args.out} exists: pass --overwrite to replace it, or another --out")
    images = load_dataset(args.dataset, args.data_dir, shape=shape)
    names = class_names_of_data(args.dataset, images)
    if not names:
        raise UserError(f"the {args.dataset} images have no classes to caption: pass a class-labelled --dataset (mnist, "
                        f"fashion-mnist) or a --data-dir with one subfolder per class")
    folders = [name.replace("/", "-") for name in names]  # a class name may hold a path separator (T-shirt/top)
    stage = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(stage, ignore_errors=True)
    for folder in folders:
        os.makedirs(os.path.join(stage, folder))
    rows, templates = [], args.templates
    for i in progress(range(len(images)), desc="captions"):
        x, y = images[i]
        file_name = f"{folders[int(y)]}/{i:06d}.png"
        u8 = to_uint8(x).permute(1, 2, 0).squeeze(-1).numpy()
        Image.fromarray(u8).save(os.path.join(stage, file_name))
        rows.append(dict(file_name=file_name, text=templates[i % len(templates)].format(names[int(y)].lower())))
    with open(os.path.join(stage, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    prompts = [[t.format(n.lower()) for t in templates] for n in names]  # prompts[k][j]: class k in template j
    held_out = [prompts[k][k % len(templates)] for k in range(len(names))]
    distilled = [prompts[k][j] for j in range(len(templates)) for k in range(len(names)) if j != k % len(templates)]
    for name, lines in (("prompts.txt", distilled), ("eval_prompts.txt", held_out)):
        with open(os.path.join(stage, name), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(stage, args.out)
    print(f"captions: {len(rows)} images of {len(names)} classes in {args.out} (metadata.jsonl), "
          f"{len(distilled)} prompts in prompts.txt, {len(held_out)} held out from distillation in eval_prompts.txt")


if __name__ == "__main__":
    run(main)
