// The widget's own styles, scoped by the `sb-` prefix so the host page's stay untouched.
export const css = `
.sb-widget { position: fixed; right: 24px; bottom: 24px; width: 340px; max-height: 560px;
  display: flex; flex-direction: column; gap: 8px; padding: 12px; box-sizing: border-box;
  font: 14px/1.4 system-ui, sans-serif; color: #1d2330; background: #fff;
  border: 1px solid #d6dae3; border-radius: 12px; box-shadow: 0 8px 28px rgba(20, 30, 60, .18); }
.sb-head { font-weight: 600; font-size: 16px; }
.sb-start, .sb-composer { display: flex; flex-direction: column; gap: 6px; }
.sb-composer { flex-direction: row; }
.sb-widget input, .sb-widget textarea { font: inherit; padding: 6px 8px; border: 1px solid #c4c9d4;
  border-radius: 6px; flex: 1; }
.sb-widget button { font: inherit; padding: 6px 12px; border: 0; border-radius: 6px;
  background: #2f5bea; color: #fff; cursor: pointer; }
.sb-status { margin: 0; color: #4a5468; }
.sb-conversation { overflow-y: auto; min-height: 120px; max-height: 300px; }
.sb-messages { list-style: none; margin: 0; padding: 0; display: flex; flex-direction: column; gap: 6px; }
.sb-messages li { max-width: 80%; padding: 6px 10px; border-radius: 10px; background: #eef1f6;
  display: flex; flex-direction: column; }
.sb-messages li.sb-mine { align-self: flex-end; background: #dfe8ff; }
.sb-who { font-size: 11px; color: #6b7486; }
.sb-read { font-size: 11px; color: #2f8a4a; align-self: flex-end; }
.sb-typing { margin: 0; font-style: italic; color: #6b7486; }
.sb-error { margin: 0; color: #b3261e; }
[hidden] { display: none !important; }
`;
