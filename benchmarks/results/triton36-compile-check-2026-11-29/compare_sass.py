import re, sys
def parse(path):
    out, label = {}, None
    for line in open(path):
        m = re.match(r"^(sm_\d+) (.*?)\s+\d+\.\d s  (ok|FAIL.*)$", line.rstrip("\n"))
        if m:
            label = (m.group(1), m.group(2).strip()); out[label] = [m.group(3), None]; continue
        m = re.match(r"^\s+sass: (\d+) instructions, loop bodies \[(.*?)\], (\d+) MMA, (\S+) after", line)
        if m and label:
            out[label][1] = (int(m.group(1)), m.group(2), int(m.group(3)), m.group(4))
    return out
a, b = parse("run36_sass.log"), parse("run38_sass.log")
filt = sys.argv[1] if len(sys.argv) > 1 else ""
print(f"{'arch':5} {'variant':95} | 3.6: total loop MMA after | 3.8: total loop MMA after")
for k in a:
    if filt not in k[1]: continue
    s6, s8 = a[k][1], b.get(k, [None, None])[1]
    f = lambda s: f"{s[0]:6d} [{s[1]:>11}] {s[2]:3d} {s[3]:>5}" if s else "-"
    print(f"{k[0]:5} {k[1]:95} | {f(s6)} | {f(s8)}")
