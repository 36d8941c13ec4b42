package bench

import (
	"bytes"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"strings"
)

// Panel is one chart of Chart: a bar per path.
type Panel struct {
	Title string
	Value func(Summary) float64
	// Format renders a value next to its bar.
	Format func(float64) string
}

// DefaultPanels are the figures of the data-plane table worth seeing side by side.
func DefaultPanels() []Panel {
	proxyCPU := func(f func(Summary) []float64) func(Summary) float64 {
		return func(s Summary) float64 {
			if len(s.Accounts) == 0 {
				return 0
			}
			return f(s)[0]
		}
	}
	return []Panel{
		{"keep-alive requests/s", func(s Summary) float64 { return s.KeepAliveRate }, Thousands},
		{"new connections/s", func(s Summary) float64 { return s.CloseRate }, Thousands},
		{"bulk download mb/s", func(s Summary) float64 { return s.BulkMBps }, Thousands},
		{"proxy cpu us per keep-alive request (lower is better)", proxyCPU(func(s Summary) []float64 { return s.PerRequest }),
			func(v float64) string { return fmt.Sprintf("%.1f", v) }},
		{"proxy cpu us per new connection (lower is better)", proxyCPU(func(s Summary) []float64 { return s.PerConn }),
			func(v float64) string { return fmt.Sprintf("%.0f", v) }},
	}
}

const (
	chartWidth  = 1100
	glyphScale  = 2
	glyphW      = 5
	glyphH      = 7
	charAdvance = (glyphW + 1) * glyphScale
	lineHeight  = (glyphH + 4) * glyphScale
	barHeight   = lineHeight - 6
	margin      = 12
)

var palette = []color.RGBA{
	{0x4c, 0x72, 0xb0, 0xff}, {0xdd, 0x84, 0x52, 0xff}, {0x55, 0xa8, 0x68, 0xff}, {0xc4, 0x4e, 0x52, 0xff},
	{0x81, 0x72, 0xb3, 0xff}, {0x93, 0x78, 0x60, 0xff}, {0xda, 0x8b, 0xc3, 0xff}, {0x8c, 0x8c, 0x8c, 0xff},
}

// Chart draws one panel of horizontal bars per figure, a bar per path in a colour of its own,
// each labelled with its value and, against the reference path, its ratio. It is drawn with the
// standard library only (a built-in 5x7 font), so it needs no font files or plotting tools.
func Chart(title string, summaries []Summary, reference string, panels []Panel) ([]byte, error) {
	labelW := 0
	for _, s := range summaries {
		labelW = max(labelW, len(s.Name))
	}
	labelW = labelW*charAdvance + 2*margin
	height := margin + 2*lineHeight
	for range panels {
		height += lineHeight*(len(summaries)+1) + margin
	}
	img := image.NewRGBA(image.Rect(0, 0, chartWidth, height))
	draw.Draw(img, img.Bounds(), image.NewUniform(color.White), image.Point{}, draw.Src)
	black := color.RGBA{0x20, 0x20, 0x20, 0xff}
	grey := color.RGBA{0x70, 0x70, 0x70, 0xff}
	y := margin
	drawText(img, margin, y, title, black)
	y += 2 * lineHeight
	var ref *Summary
	for i := range summaries {
		if summaries[i].Name == reference {
			ref = &summaries[i]
		}
	}
	valueW := 18 * charAdvance
	barSpace := chartWidth - labelW - valueW - margin
	for _, p := range panels {
		drawText(img, margin, y, p.Title, black)
		y += lineHeight
		top := 0.0
		for _, s := range summaries {
			top = max(top, p.Value(s))
		}
		for i, s := range summaries {
			v := p.Value(s)
			drawText(img, margin, y, s.Name, grey)
			if v > 0 {
				w := int(float64(barSpace) * v / top)
				fill(img, image.Rect(labelW, y, labelW+max(w, 1), y+barHeight), palette[i%len(palette)])
				text := p.Format(v)
				if ref != nil && ref.Name != s.Name && p.Value(*ref) > 0 {
					text += fmt.Sprintf(" (%.2fx)", v/p.Value(*ref))
				}
				drawText(img, labelW+w+margin/2, y, text, black)
			} else {
				drawText(img, labelW+margin/2, y, "n/a", grey)
			}
			y += lineHeight
		}
		y += margin
	}
	var out bytes.Buffer
	if err := png.Encode(&out, img); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

func fill(img *image.RGBA, r image.Rectangle, c color.RGBA) {
	draw.Draw(img, r, image.NewUniform(c), image.Point{}, draw.Src)
}

// drawText writes s (lower-cased) at x, y (top left) in the built-in font.
func drawText(img *image.RGBA, x, y int, s string, c color.RGBA) {
	for _, r := range strings.ToLower(s) {
		g, ok := glyphs[r]
		if !ok {
			g = glyphs['?']
		}
		top := y + 2
		if strings.ContainsRune(descenders, r) {
			top += 2 * glyphScale
		}
		for gy, row := range strings.Split(g, " ") {
			for gx, px := range row {
				if px == '#' {
					fill(img, image.Rect(x+gx*glyphScale, top+gy*glyphScale, x+(gx+1)*glyphScale, top+(gy+1)*glyphScale), c)
				}
			}
		}
		x += charAdvance
	}
}

// descenders are drawn two rows lower: their glyphs start at the top of the small letters.
const descenders = "gpqy"

// glyphs is a 5x7 font: seven rows, top first, '#' for ink.
var glyphs = map[rune]string{
	'0': ".###. #...# #..## #.#.# ##..# #...# .###.",
	'1': "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
	'2': ".###. #...# ....# ...#. ..#.. .#... #####",
	'3': "##### ...#. ..#.. ...#. ....# #...# .###.",
	'4': "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
	'5': "##### #.... ####. ....# ....# #...# .###.",
	'6': "..##. .#... #.... ####. #...# #...# .###.",
	'7': "##### ....# ...#. ..#.. .#... .#... .#...",
	'8': ".###. #...# #...# .###. #...# #...# .###.",
	'9': ".###. #...# #...# .#### ....# ...#. .##..",
	'a': "..... ..... .###. ....# .#### #...# .####",
	'b': "#.... #.... #.##. ##..# #...# #...# ####.",
	'c': "..... ..... .###. #.... #.... #...# .###.",
	'd': "....# ....# .##.# #..## #...# #...# .####",
	'e': "..... ..... .###. #...# ##### #.... .###.",
	'f': "..##. .#..# .#... ###.. .#... .#... .#...",
	'g': ".#### #...# #...# .#### ....# ....# .###.",
	'h': "#.... #.... #.##. ##..# #...# #...# #...#",
	'i': "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
	'j': "...#. ..... ..##. ...#. ...#. #..#. .##..",
	'k': "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
	'l': ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
	'm': "..... ..... ##.#. #.#.# #.#.# #...# #...#",
	'n': "..... ..... #.##. ##..# #...# #...# #...#",
	'o': "..... ..... .###. #...# #...# #...# .###.",
	'p': "####. #...# #...# ####. #.... #.... #....",
	'q': ".#### #...# #...# .#### ....# ....# ....#",
	'r': "..... ..... #.##. ##..# #.... #.... #....",
	's': "..... ..... .###. #.... .###. ....# ####.",
	't': ".#... .#... ###.. .#... .#... .#..# ..##.",
	'u': "..... ..... #...# #...# #...# #..## .##.#",
	'µ': "..... ..... #...# #...# #..## ##.#. #....",
	'v': "..... ..... #...# #...# #...# .#.#. ..#..",
	'w': "..... ..... #...# #...# #.#.# #.#.# .#.#.",
	'x': "..... ..... #...# .#.#. ..#.. .#.#. #...#",
	'y': "#...# #...# #...# .#### ....# ....# .###.",
	'z': "..... ..... ##### ...#. ..#.. .#... #####",
	' ': "..... ..... ..... ..... ..... ..... .....",
	'.': "..... ..... ..... ..... ..... .##.. .##..",
	',': "..... ..... ..... ..... .##.. ..#.. .#...",
	'-': "..... ..... ..... ##### ..... ..... .....",
	'–': "..... ..... ..... ##### ..... ..... .....",
	'(': "...#. ..#.. .#... .#... .#... ..#.. ...#.",
	')': ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
	'/': "..... ....# ...#. ..#.. .#... #.... .....",
	':': "..... .##.. .##.. ..... .##.. .##.. .....",
	'=': "..... ..... ##### ..... ##### ..... .....",
	'%': "##... ##..# ...#. ..#.. .#... #..## ...##",
	'_': "..... ..... ..... ..... ..... ..... #####",
	'+': "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
	'?': ".###. #...# ....# ...#. ..#.. ..... ..#..",
}
