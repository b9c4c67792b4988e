// Click a heading to sort by it (again to reverse); cells with data-v sort as numbers, others as text.
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('thead tr:last-child th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.from(body.rows), up = th.dataset.dir !== 'up';
      th.dataset.dir = up ? 'up' : 'down';
      function key(row) { var c = row.cells[col];
        if (!c || c.colSpan > 1) return up ? Infinity : -Infinity;  // a skipped row's reason: always last
        return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : c.textContent; }
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        if (typeof x === 'number' && typeof y === 'number') return x === y ? 0 : (up ? x - y : y - x);
        if (typeof x === 'number') return 1; if (typeof y === 'number') return -1;
        return up ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x)); });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
