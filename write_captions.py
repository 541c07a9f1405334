"""Write an image-caption folder from a class-labelled dataset: the data of a text-to-image teacher, in the convention
of diffusers' training scripts and datasets' imagefolder (images, plus metadata.jsonl with file_name and text).

    python write_captions.py --dataset fashion-mnist --out runs/fashion-mnist-text/captions
    python write_captions.py --data-dir my_images --image-size 32 --out runs/custom-text/captions   # class subfolders

Image i of the training split is <out>/<class>/<i>.png, captioned with template i % (number of templates) of
--templates then --eval-templates, filled with its class name ("a photo of a sandal"). Also writes prompts.txt, the
classes in --templates (the prompts to distill for: distill.py --prompts), and eval_prompts.txt, the classes in
--eval-templates, held out from distillation (the yardstick's prompts: evaluate.py --prompts). The teacher is trained
on both: a text encoder made here (models.make_text_encoder) is random and frozen, so a phrasing its teacher never
saw is noise to it, where SD's CLIP generalises; the student is still scored on prompts it was not distilled for.
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
    p.add_argument("--templates", nargs="+", default=["a photo of a {}", "a picture of a {}", "an image of a {}", "a {}"],
                   help="captions, {} = the class name; image i gets template i %% their number")
    p.add_argument("--eval-templates", nargs="+", default=["a good photo of a {}"],
                   help="prompts for evaluation, held out from distillation's (the teacher's captions use them too)")
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    p.add_argument("--image-size", type=number(int, 0), default=None, help="your own images (--data-dir, no --dataset): their square size")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None, help="your own images: grey (1) or RGB (3); default 3")
    args = parse(p)
    spec = PRESETS[args.dataset]
    if not spec["shape"] and not args.image_size:
        raise UserError("your own images need --image-size (and --data-dir with class subfolders)")
    shape = spec["shape"] or (args.channels or 3, args.image_size, args.image_size)
    for template in args.templates + args.eval_templates:
        if template.count("{}") != 1:
            raise UserError(f"template {template!r} needs one {{}} for the class name, e.g. 'a photo of a {{}}'")
    if set(args.templates) & set(args.eval_templates):
        raise UserError("--eval-templates must differ from --templates: they are the held-out prompts")
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
    rows, captions = [], args.templates + args.eval_templates
    for i in progress(range(len(images)), desc="captions"):
        x, y = images[i]
        file_name = f"{folders[int(y)]}/{i:06d}.png"
        u8 = to_uint8(x).permute(1, 2, 0).squeeze(-1).numpy()
        Image.fromarray(u8).save(os.path.join(stage, file_name))
        rows.append(dict(file_name=file_name, text=captions[i % len(captions)].format(names[int(y)].lower())))
    with open(os.path.join(stage, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    for name, templates in (("prompts.txt", args.templates), ("eval_prompts.txt", args.eval_templates)):
        with open(os.path.join(stage, name), "w", encoding="utf-8") as f:
            f.writelines(t.format(n.lower()) + "\n" for t in templates for n in names)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(stage, args.out)
    print(f"captions: {len(rows)} images of {len(names)} classes in {args.out} (metadata.jsonl), "
          f"{len(args.templates) * len(names)} prompts in prompts.txt, {len(args.eval_templates) * len(names)} held out "
          f"from distillation in eval_prompts.txt")


if __name__ == "__main__":
    run(main)
