// A view whose code is fetched on its first use (a separate chunk of the build), with a polite placeholder
// meanwhile and a message if the chunk cannot be fetched (e.g. the mesh was upgraded under an open tab).

import type { ComponentType } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ErrorNote, Note } from "./Status";

export function later<P extends object>(
  load: () => Promise<ComponentType<P>>,
): ComponentType<P> {
  let loaded: ComponentType<P> | null = null;
  let pending: Promise<ComponentType<P>> | null = null;
  return function Later(props: P) {
    const [view, setView] = useState<ComponentType<P> | null>(loaded);
    const [failed, setFailed] = useState<unknown>(null);
    useEffect(() => {
      if (loaded) return;
      let live = true;
      pending ??= load();
      pending.then(
        (component) => {
          loaded = component;
          if (live) setView(() => component);
        },
        (err: unknown) => {
          pending = null;
          if (live) setFailed(new Error(`This view could not be loaded (${String(err)}). Reload the page.`));
        },
      );
      return () => {
        live = false;
      };
    }, []);
    if (failed) return <ErrorNote error={failed} />;
    if (!view) return <Note>Loading…</Note>;
    const View = view;
    return <View {...props} />;
  };
}
