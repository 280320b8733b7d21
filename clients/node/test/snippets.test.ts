// docs/storefront.md shows the snippets that tsconfig.snippets.json type-checks: each
// `<!-- snippet: PATH -->` is followed by a code block holding exactly that file.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { ROOT } from "./support.js";

test("every snippet in docs/storefront.md is the file that is type-checked", () => {
  const doc = readFileSync(join(ROOT, "docs", "storefront.md"), "utf8");
  const shown = [...doc.matchAll(/<!-- snippet: (\S+) -->\n```ts\n([\s\S]*?)```/g)];
  assert.deepEqual(
    shown.map((m) => m[1]),
    ["clients/node/snippets/express.ts", "clients/node/snippets/next-route.ts", "clients/node/snippets/nuxt-route.ts"],
  );
  for (const [, path, code] of shown) {
    assert.equal(code, readFileSync(join(ROOT, path!), "utf8"), `${path} differs from its block in docs/storefront.md`);
  }
});
