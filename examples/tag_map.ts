// Resolver in TypeScript: turn a list of "key=value" labels into a tag map,
// lowercasing keys. Labels without "=" are reported and skipped.
// Run: veritech run examples/tag_map.ts --response-type object --args @examples/args/labels.json
interface Input {
  labels: string[];
  prefix?: string;
}

type TagMap = Record<string, string>;

export function main(input: Input): TagMap {
  const tags: TagMap = {};
  for (const label of input.labels) {
    const at = label.indexOf("=");
    if (at <= 0) {
      console.warn(`skipped label without a key: ${JSON.stringify(label)}`);
      continue;
    }
    const key: string = (input.prefix ?? "") + label.slice(0, at).trim().toLowerCase();
    tags[key] = label.slice(at + 1).trim();
  }
  console.log(`${Object.keys(tags).length} tags`);
  return tags;
}
